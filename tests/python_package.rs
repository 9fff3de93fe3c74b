//! The Python package (python/, PyO3 + maturin): `scripts/python-test.sh` builds and installs it
//! into a virtual environment and runs its pytest suite (python/tests) against the committed
//! reference fixtures and this build's CLI.

mod common;

#[test]
fn the_python_package_passes_its_tests() {
    let why = "python3 cannot make a virtual environment";
    let Some(printed) = common::run_script("python-test.sh", &[], &[], "python package", why)
    else {
        return;
    };
    assert!(
        printed.contains(" passed"),
        "pytest ran no test:\n{printed}"
    );
}
