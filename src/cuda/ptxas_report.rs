//! The parser of ptxas's resource report (`--ptxas-options=-v`), shared by `build.rs`, which
//! turns the report of every CUBIN into `KERNEL_RESOURCES`, and this crate's tests, which check
//! it against real reports (`tests/fixtures/ptxas`, made by `tools/make_ptxas_fixtures.py`).

/// One kernel's resources as ptxas reports them.
#[derive(Debug, PartialEq, Eq)]
pub struct Resources {
    pub kernel: String,
    pub registers: u32,
    pub static_shared_bytes: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

/// The entry functions of a report, in its order. Stack and spill lines count for the entry
/// being compiled (also those of device functions it calls that were not inlined). A line that
/// should carry a number and does not, or an entry without its register count, is an error:
/// a spill misread as none would pass the spill test.
pub fn parse(log: &str) -> Result<Vec<Resources>, String> {
    // The number before `unit` in `text` ("... 128 registers, ..., 20480 bytes smem").
    fn number_before(text: &str, unit: &str) -> Option<u32> {
        let end = text.find(unit)?;
        text[..end]
            .split([' ', ','])
            .rev()
            .find(|w| !w.is_empty())?
            .parse()
            .ok()
    }
    let unread = |line: &str| format!("ptxas report line not understood: {line:?}");
    let mut kernels: Vec<Resources> = Vec::new();
    let mut registers_seen = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let kernel = rest.split('\'').next().unwrap_or_default().to_string();
            kernels.push(Resources {
                kernel,
                registers: 0,
                static_shared_bytes: 0,
                stack_bytes: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
            });
            registers_seen.push(false);
            continue;
        }
        let Some(k) = kernels.last_mut() else {
            continue;
        };
        if line.contains("bytes stack frame") {
            let stack = number_before(line, " bytes stack frame");
            let stores = number_before(line, " bytes spill stores");
            let loads = number_before(line, " bytes spill loads");
            let (Some(stack), Some(stores), Some(loads)) = (stack, stores, loads) else {
                return Err(unread(line));
            };
            k.stack_bytes += stack;
            k.spill_store_bytes += stores;
            k.spill_load_bytes += loads;
        } else if line.contains("Used ") && line.contains(" registers") {
            k.registers = number_before(line, " registers").ok_or_else(|| unread(line))?;
            // No smem entry: the kernel has no static shared memory.
            if line.contains(" bytes smem") {
                k.static_shared_bytes =
                    number_before(line, " bytes smem").ok_or_else(|| unread(line))?;
            }
            *registers_seen.last_mut().expect("one per kernel") = true;
        }
    }
    match kernels
        .iter()
        .zip(&registers_seen)
        .find(|(_, seen)| !**seen)
    {
        Some((k, _)) => Err(format!(
            "ptxas report has no register count for {}",
            k.kernel
        )),
        None => Ok(kernels),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/ptxas")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The figures below are read off the fixture files by eye.
    #[test]
    fn reads_a_real_report_of_several_entries() {
        let kernels = parse(&fixture("group_norm.sm_90.log")).unwrap();
        let names: Vec<&str> = kernels.iter().map(|k| k.kernel.as_str()).collect();
        assert_eq!(
            names,
            [
                "group_norm_apply_bf16",
                "group_norm_partial_bf16",
                "group_norm_apply_f16",
                "group_norm_partial_f16",
                "group_norm_apply_f32",
                "group_norm_partial_f32",
                "group_norm_merge"
            ]
        );
        assert_eq!(
            kernels[1],
            Resources {
                kernel: "group_norm_partial_bf16".into(),
                registers: 48,
                static_shared_bytes: 24576,
                stack_bytes: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
            }
        );
        assert_eq!(
            (kernels[6].registers, kernels[6].static_shared_bytes),
            (26, 1536)
        );
    }

    #[test]
    fn reads_spills_and_a_kernel_without_shared_memory() {
        let kernels = parse(&fixture("spill.sm_90.log")).unwrap();
        assert_eq!(kernels.len(), 2);
        assert_eq!(
            kernels[0],
            Resources {
                kernel: "store_one".into(),
                registers: 10,
                static_shared_bytes: 0,
                stack_bytes: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
            }
        );
        assert_eq!(
            kernels[1],
            Resources {
                kernel: "spill".into(),
                registers: 32,
                static_shared_bytes: 0,
                stack_bytes: 896,
                spill_store_bytes: 1372,
                spill_load_bytes: 1456,
            }
        );
    }

    #[test]
    fn an_unreadable_figure_is_an_error_not_zero() {
        let report = fixture("spill.sm_90.log");
        let garbled = report.replace("1372 bytes spill stores", "many bytes spill stores");
        let err = parse(&garbled).unwrap_err();
        assert!(err.contains("many bytes spill stores"), "{err}");
        let no_registers = report.replace("Used 32 registers", "Used registers");
        assert!(parse(&no_registers).is_err());
        let missing: String = report
            .lines()
            .filter(|l| !l.contains("Used 32"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            parse(&missing).unwrap_err(),
            "ptxas report has no register count for spill"
        );
    }
}
