//! Python virtualenvs for the interop tests, made by the tests themselves
//! under Cargo's target tmp dir, so `cargo test` on a fresh clone needs
//! only python3 (and PyPI on the first run). As root on Debian it also
//! installs python3-venv if the venv module is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The python of the virtualenv `name`, with `requirements` (the text of a
/// pip requirements file) installed; made once, and again whenever the
/// requirements change. Blocking: call it off the async runtime's threads.
pub fn python(name: &str, requirements: &str) -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let python = venv.join("bin/python");
    let marker = venv.join(".installed");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == requirements) {
        return python;
    }
    if !make_venv(&venv) && install_python3_venv() {
        assert!(
            make_venv(&venv),
            "python3 -m venv still fails after installing python3-venv"
        );
    }
    assert!(
        python.exists(),
        "cannot create a virtualenv with `python3 -m venv`: install python3 and its venv module (Debian: apt-get install python3-venv)"
    );
    let file = venv.join("requirements.txt");
    std::fs::write(&file, requirements).unwrap();
    let pip = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "-r",
        ])
        .arg(&file)
        .status()
        .expect("pip runs");
    assert!(
        pip.success(),
        "pip install for the {name} virtualenv failed (is PyPI reachable?)"
    );
    std::fs::write(&marker, requirements).unwrap();
    python
}

fn make_venv(venv: &Path) -> bool {
    let _ = std::fs::remove_dir_all(venv);
    Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv)
        .status()
        .is_ok_and(|s| s.success())
}

/// Debian's python3 comes without ensurepip; as root on a Debian-like
/// machine, install the package that brings it. Returns whether it did.
fn install_python3_venv() -> bool {
    apt_install("python3-venv")
}

/// Installs Debian `package` when `program` is missing and the suite runs
/// as root on a Debian-like machine; otherwise leaves it to the test that
/// needs it to say so.
pub fn apt_install_if_missing(program: &str, package: &str) {
    if !Path::new(program).exists() {
        apt_install(package);
    }
}

/// `apt-get install package` as root on a Debian-like machine. Returns
/// whether it succeeded (false when not root or without apt-get).
fn apt_install(package: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root || !Path::new("/usr/bin/apt-get").exists() {
        return false;
    }
    eprintln!("installing the Debian package {package} with apt-get");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    apt(&["update", "-q"]) && apt(&["install", "-y", "-q", package])
}
