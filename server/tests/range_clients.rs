//! Independent HTTP clients against the real server's artifact endpoint:
//! `curl -C -` and `wget -c` resume partial downloads, `aria2c -x8` fetches
//! with eight parallel range connections, all at once, and every file ends
//! byte-identical. A two-range request gets the whole file (RFC 9110 §14.2),
//! not `416`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use rand::RngCore;

fn run(tool: &str, args: &[&str], dir: &Path) {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_wget_and_aria2c_resume_and_fetch_in_parallel() {
    let tools = [("curl", "curl"), ("wget", "wget"), ("aria2c", "aria2")];
    if !tools.iter().all(|(t, p)| require_tool(t, p)) {
        return;
    }
    let ts = TestServer::start("").await;
    let mut data = vec![0u8; 12 << 20];
    rand::rng().fill_bytes(&mut data);
    let src = ts.dir.path().join("artifact.bin");
    std::fs::write(&src, &data).unwrap();
    let (digest, _) = ts.app().artifacts.put_file(&src).await.unwrap();
    let name = digest.to_hex();
    let url = format!("{}/api/v1/artifacts/{name}", ts.base);
    let auth = format!("Authorization: Bearer {ADMIN}");
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // Interrupted downloads: the first 1 MiB (curl) and 5 MiB + 17 (wget).
    std::fs::write(dirs[0].path().join(&name), &data[..1 << 20]).unwrap();
    std::fs::write(dirs[1].path().join(&name), &data[..(5 << 20) + 17]).unwrap();
    let jobs = [
        (
            "curl",
            vec!["-sS", "-f", "-C", "-", "-H", &auth, "-o", &name, &url],
            dirs[0].path(),
        ),
        (
            "wget",
            vec!["-q", "-c", "--header", &auth, "-O", &name, &url],
            dirs[1].path(),
        ),
        (
            "aria2c",
            vec![
                "-q",
                "-x8",
                "-s8",
                "-k1M",
                "--min-split-size=1M",
                "--header",
                &auth,
                "-o",
                &name,
                &url,
            ],
            dirs[2].path(),
        ),
    ];
    std::thread::scope(|s| {
        for (tool, args, dir) in &jobs {
            s.spawn(move || run(tool, args, dir));
        }
    });
    for ((tool, _, _), dir) in jobs.iter().zip(&dirs) {
        let got = std::fs::read(dir.path().join(&name)).unwrap();
        assert!(got == data, "{tool}: {} bytes, not the artifact", got.len());
    }
    // Two satisfiable ranges: the whole file with 200, not 416.
    let out = Command::new("curl")
        .args(["-sS", "-H", &auth, "-r", "0-9,20-29", "-o", "/dev/null"])
        .args(["-w", "%{http_code} %{size_download}", &url])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("200 {}", data.len())
    );
}
