//! `scripts/make-images.sh`: a size too small for the content is refused
//! before anything is written, naming the minimum (it used to fail inside
//! mkfs.ext4 with `Could not allocate block` and leave a partial image), and
//! `auto` sizes the images to their content. Needs e2fsprogs (CI installs
//! it; without it the test fails under `CI=true` and skips elsewhere).

use std::path::Path;
use std::process::Command;

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-images.sh")
}

fn have_e2fsprogs() -> bool {
    let ok = ["mkfs.ext4", "e2fsck"]
        .iter()
        .all(|t| Command::new(t).arg("-V").output().is_ok());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "mkfs.ext4/e2fsck missing: apt-get install e2fsprogs"
        );
        eprintln!("SKIP: make_images needs e2fsprogs (apt-get install e2fsprogs)");
    }
    ok
}

#[test]
fn a_size_below_the_content_is_refused_with_the_minimum_and_auto_fits() {
    if !have_e2fsprogs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("images");
    let o = Command::new(script()).arg(&out).arg("32").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("too small") && err.contains("at least"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a refused run left {left:?}");
    let min: u64 = err
        .split("at least ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no minimum in {err}"));

    let o = Command::new(script())
        .arg(&out)
        .arg("auto")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for v in ["v1.img", "v2.img"] {
        let img = out.join(v);
        assert_eq!(std::fs::metadata(&img).unwrap().len(), min << 20, "{v}");
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{v}: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}
