//! WordPiece tokenisation through the `tokenizers` crate, set up as sentence-transformers
//! calls it: `[CLS] ... [SEP]`, truncated to the model's maximum sequence length, no padding.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{Error, Result};
use crate::files::{read_limited, JSON_LIMIT};

/// The tokens of one text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// Token ids, `[CLS]` first and `[SEP]` last.
    pub ids: Vec<u32>,
    /// Segment ids (all 0 for a single text).
    pub type_ids: Vec<u32>,
}

/// A tokenizer loaded from a `tokenizer.json`, with its own truncation and padding replaced.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The same tokenizer without truncation, to count what a text loses to it.
    whole: Tokenizer,
    max_tokens: usize,
}

impl TextTokenizer {
    /// Loads `path` and truncates every text to `max_tokens` tokens, `[CLS]` and `[SEP]`
    /// included.
    pub fn from_file(path: &Path, max_tokens: usize) -> Result<Self> {
        if max_tokens < 2 {
            return Err(Error::Config(format!(
                "max_tokens {max_tokens} leaves no room for [CLS] and [SEP]"
            )));
        }
        let bad = |e: tokenizers::Error| Error::Config(format!("{}: {e}", path.display()));
        let bytes = read_limited(path, JSON_LIMIT, "tokenizer file")?;
        let mut inner = Tokenizer::from_bytes(bytes).map_err(bad)?;
        // all-MiniLM-L6-v2's tokenizer.json pads to and truncates at 128; sentence-transformers
        // overrides both (256, pad to the longest in a batch). Padding is done by the encoder
        // with an attention mask, so the tokenizer does none.
        inner.with_padding(None);
        let mut whole = inner.clone();
        whole.with_truncation(None).map_err(bad)?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(bad)?;
        Ok(TextTokenizer {
            inner,
            whole,
            max_tokens,
        })
    }

    /// The longest token sequence produced, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The tokens of `text` before truncation, special tokens included.
    pub fn count(&self, text: &str) -> Result<usize> {
        self.whole
            .encode(text, true)
            .map(|enc| enc.get_ids().len())
            .map_err(|e| Error::Input(format!("tokenising {text:?}: {e}")))
    }

    /// Tokenises one text, with special tokens.
    pub fn encode(&self, text: &str) -> Result<Tokens> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Input(format!("tokenising {text:?}: {e}")))?;
        Ok(Tokens {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
        })
    }
}
