//! The `zoo` command line.

use std::process::Command;

fn zoo(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("the zoo binary runs");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn list_shows_every_registered_model() {
    let (ok, out, _) = zoo(&["list"]);
    assert!(ok);
    for name in [
        "quicknet",
        "quicknet-lab",
        "quicknet-small",
        "quicknet-large",
        "birealnet",
        "birealnet-lab",
        "reactnet",
        "reactnet-lab",
        "xnornet",
        "xnornet-lab",
        "labbnn",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} missing:\n{out}"
        );
    }
}

#[test]
fn summary_of_quicknet_reports_larq_zoo_totals() {
    let (ok, out, err) = zoo(&["summary", "specs/quicknet.yaml"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("Parameters                   13,239,688 (13.2 M)"),
        "{out}"
    );
    assert!(
        out.contains("Binary MACs                  1,849,688,064 (1.85 G)"),
        "{out}"
    );
    assert!(out.contains("98.4% binary"), "{out}");
    assert!(out.contains("stage2.transition.blur"), "{out}");
}

#[test]
fn summary_takes_input_and_classes() {
    let (ok, out, err) = zoo(&[
        "summary",
        "quicknet-lab",
        "--input",
        "32x32x1",
        "--classes",
        "10",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("Input: 32x32x1 (HxWxC), 10 classes"), "{out}");
    assert!(out.contains("stage1.block1.conv"));
    assert!(
        out.lines()
            .any(|l| l.starts_with("head.dense1") && l.contains("1x1x10")),
        "{out}"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let (ok, _, err) = zoo(&["summary", "quicknet", "--input", "224x224"]);
    assert!(!ok);
    assert!(err.contains("expected an input shape HxWxC"), "{err}");
    let (ok, _, err) = zoo(&["summary", "quicknet", "--classes", "0"]);
    assert!(
        !ok && err.contains("expected a positive number of classes"),
        "{err}"
    );
    let (ok, _, err) = zoo(&["summary", "resnet"]);
    assert!(!ok && err.contains("unknown model `resnet`"), "{err}");
    let (ok, _, err) = zoo(&["summary", "reactnet", "--input", "28x28x1"]);
    assert!(!ok, "ReActNet does not fit 28x28");
    assert!(
        err.contains("specs/reactnet.yaml:") && err.contains("stage3.block1.res1"),
        "{err}"
    );
}
