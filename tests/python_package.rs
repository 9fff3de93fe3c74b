//! The Python package (python/, PyO3 + maturin): `scripts/python-test.sh` builds and installs it
//! into a virtual environment and runs its pytest suite (python/tests) against the committed
//! reference fixtures and this build's CLI.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn the_python_package_passes_its_tests() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/python-test.sh");
    let out = common::output(Command::new(&script).env("MCDM_BIN", env!("CARGO_BIN_EXE_mcdm")));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{printed}");
    if out.status.code() == Some(77) {
        common::skip(
            "python package",
            "python3 cannot make a virtual environment",
        );
        return;
    }
    assert!(
        out.status.success(),
        "scripts/python-test.sh failed:\n{printed}"
    );
    assert!(
        printed.contains(" passed"),
        "pytest ran no test:\n{printed}"
    );
}
