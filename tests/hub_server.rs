//! The test Hugging Face Hub server (tests/support/hub_server.rs) through the two real clients:
//! the `hf-hub` crate's blocking API, and Python's official `huggingface_hub`
//! (tests/support/hub_python.py, run with the interpreter `ZOO_HUB_PYTHON` names).

#[path = "support/hub_server.rs"]
mod hub_server;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hf_hub::repository::CommitOperation;
use hf_hub::{HFClientBuilder, HFClientSync, HFError, HFRepositorySync, RepoTypeModel};
use hub_server::HubServer;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The token the clients send (the server accepts any unless told otherwise).
const TOKEN: &str = "hf_zoo_tests";

/// Size of the `model.safetensors` of the sample folders: enough for several network reads.
const MODEL_SIZE: usize = 1536 * 1024;

/// A model folder: small text files (one nested, and a `README.md`, which Python's client
/// validates with the hub) and a binary `model.safetensors`, which the hub routes to git-LFS.
fn sample_files(seed: u64) -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "config.json".to_owned(),
            format!("{{\"seed\": {seed}}}\n").into_bytes(),
        ),
        (
            "README.md".to_owned(),
            format!("# Sample model {seed}\n").into_bytes(),
        ),
        (
            "nested/dir/notes.txt".to_owned(),
            b"binary networks\n".to_vec(),
        ),
        ("model.safetensors".to_owned(), noise(MODEL_SIZE, seed)),
    ]
}

/// `len` pseudo-random bytes (xorshift), different for each seed.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 56) as u8
        })
        .collect()
}

fn write_folder(dir: &Path, files: &[(String, Vec<u8>)]) {
    for (path, bytes) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// An `hf-hub` client of `server`, caching into `cache`, with `token` (or the token it finds in
/// the environment, if any) and quick retries.
fn client(server: &HubServer, cache: &Path, token: Option<&str>) -> HFClientSync {
    let mut builder = HFClientBuilder::new()
        .endpoint(server.url())
        .cache_dir(cache)
        .retry_base_delay(Duration::from_millis(5));
    if let Some(token) = token {
        builder = builder.token(token);
    }
    builder.build_sync().expect("hf-hub client")
}

fn model(client: &HFClientSync, repo: &str) -> HFRepositorySync<RepoTypeModel> {
    let (org, name) = repo.split_once('/').unwrap();
    client.model(org, name)
}

/// Creates `repo` and uploads `folder` to it with `hf-hub`, returning the commit id.
fn upload_with_hf_hub(client: &HFClientSync, repo: &str, folder: &Path) -> String {
    client
        .create_repository()
        .repo_id(repo)
        .repo_type(RepoTypeModel)
        .exist_ok(true)
        .send()
        .expect("create the repo");
    let commit = model(client, repo)
        .upload_folder()
        .folder_path(folder)
        .commit_message("Upload from hf-hub")
        .send()
        .expect("upload the folder");
    commit.commit_oid.expect("the commit id")
}

/// Downloads each of `files` from `repo` with `hf-hub` into its cache (`cache`), checking the
/// bytes and that the cache records `commit` as `main`.
fn download_with_hf_hub(
    client: &HFClientSync,
    cache: &Path,
    repo: &str,
    files: &[(String, Vec<u8>)],
    commit: &str,
) {
    let handle = model(client, repo);
    for (path, bytes) in files {
        let local = handle
            .download_file()
            .filename(path.as_str())
            .send()
            .expect("download");
        assert_eq!(&std::fs::read(&local).unwrap(), bytes, "{path} differs");
    }
    let cached = repo_cache(cache, repo);
    for folder in ["blobs", "snapshots", "refs"] {
        assert!(
            cached.join(folder).is_dir(),
            "no {folder} in {}",
            cached.display()
        );
    }
    assert_eq!(
        std::fs::read_to_string(cached.join("refs/main")).unwrap(),
        commit
    );
    for (path, _) in files {
        let snapshot = cached.join("snapshots").join(commit).join(path);
        assert!(
            snapshot.symlink_metadata().unwrap().is_symlink(),
            "{} is no symlink",
            snapshot.display()
        );
    }
}

/// The folder of `repo` in the cache `cache`: `models--org--name`.
fn repo_cache(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// The requests received since the first `skip`.
fn requests_since(server: &HubServer, skip: usize) -> Vec<String> {
    server.requests().into_iter().skip(skip).collect()
}

#[test]
fn hf_hub_uploads_in_one_commit_and_downloads_into_its_cache() {
    let dir = tempfile::tempdir().unwrap();
    let server = HubServer::start(&dir.path().join("hub"));
    let folder = dir.path().join("folder");
    let files = sample_files(1);
    write_folder(&folder, &files);
    let cache = dir.path().join("cache");
    let client = client(&server, &cache, Some(TOKEN));

    let commit = upload_with_hf_hub(&client, "org/rust", &folder);
    assert!(
        commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        "{commit}"
    );
    let requests = server.requests();
    for expected in [
        "POST /api/repos/create [auth]",
        "POST /api/models/org/rust/preupload/main [auth]",
        "POST /org/rust.git/info/lfs/objects/batch [auth]",
        "POST /api/models/org/rust/commit/main [auth]",
    ] {
        assert!(
            requests.iter().any(|request| request == expected),
            "no {expected} in {requests:#?}"
        );
    }
    // No xet offered: hf-hub sends the LFS file inline in the commit rather than `PUT` it.
    assert!(
        !requests.iter().any(|request| request.starts_with("PUT ")),
        "{requests:#?}"
    );

    let before = server.requests().len();
    download_with_hf_hub(&client, &cache, "org/rust", &files, &commit);
    // The LFS file comes from the storage origin, named by its SHA-256 in the cache.
    let model_sha = sha256_hex(&files[3].1);
    let blob_get = format!("GET /lfs/{model_sha}/model.safetensors");
    assert!(
        requests_since(&server, before).contains(&blob_get),
        "{:#?}",
        server.requests()
    );
    assert!(repo_cache(&cache, "org/rust")
        .join("blobs")
        .join(&model_sha)
        .is_file());
}

#[test]
fn a_restarted_server_serves_what_it_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("hub");
    let files = sample_files(2);
    let commit = {
        let server = HubServer::start(&store);
        for (path, bytes) in &files {
            server.add_file("org/kept", path, bytes);
        }
        let client = client(&server, &dir.path().join("cache1"), Some(TOKEN));
        let port: u16 = server.url().rsplit(':').next().unwrap().parse().unwrap();
        let taken = HubServer::start_on(&dir.path().join("other"), port);
        assert!(taken.is_err(), "port {port} bound twice");
        model(&client, "org/kept")
            .info()
            .send()
            .unwrap()
            .sha
            .unwrap()
    };
    // Restarted on another port: nothing in the store depends on the URL.
    let server = HubServer::start(&store);
    let cache = dir.path().join("cache2");
    let client = client(&server, &cache, Some(TOKEN));
    let snapshot = model(&client, "org/kept")
        .snapshot_download()
        .send()
        .unwrap();
    assert_eq!(
        snapshot,
        repo_cache(&cache, "org/kept")
            .join("snapshots")
            .join(&commit)
    );
    for (path, bytes) in &files {
        assert_eq!(
            &std::fs::read(snapshot.join(path)).unwrap(),
            bytes,
            "{path} differs"
        );
    }
    let listing = format!("GET /api/models/org/kept/tree/{commit}?recursive=true [auth]");
    assert!(
        server.requests().contains(&listing),
        "{:#?}",
        server.requests()
    );
}

#[test]
fn hub_errors_surface_as_hf_hub_error_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let server = HubServer::start(&dir.path().join("hub"));
    server.add_file("org/errors", "config.json", b"{}");
    let client = client(&server, &dir.path().join("cache"), Some(TOKEN));

    let missing_repo = model(&client, "org/missing").info().send();
    assert!(
        matches!(missing_repo, Err(HFError::RepoNotFound { .. })),
        "{missing_repo:?}"
    );
    let missing_revision = model(&client, "org/errors").info().revision("nope").send();
    assert!(
        matches!(missing_revision, Err(HFError::RevisionNotFound { .. })),
        "{missing_revision:?}"
    );
    let missing_file = model(&client, "org/errors")
        .download_file()
        .filename("absent.txt")
        .send();
    assert!(
        matches!(missing_file, Err(HFError::EntryNotFound { .. })),
        "{missing_file:?}"
    );
    let existing = client
        .create_repository()
        .repo_id("org/errors")
        .repo_type(RepoTypeModel)
        .send();
    assert!(
        matches!(existing, Err(HFError::Conflict { .. })),
        "{existing:?}"
    );
}

#[test]
fn pull_request_commits_land_on_refs_pr() {
    let dir = tempfile::tempdir().unwrap();
    let server = HubServer::start(&dir.path().join("hub"));
    server.add_file("org/pr", "config.json", b"{\"v\": 1}");
    let client = client(&server, &dir.path().join("cache"), Some(TOKEN));
    let repo = model(&client, "org/pr");
    let main = repo.info().send().unwrap().sha.unwrap();

    let proposal = repo
        .create_commit()
        .operations(vec![CommitOperation::add_bytes(
            "config.json",
            b"{\"v\": 2}".to_vec(),
        )])
        .commit_message("Propose v2")
        .create_pr(true)
        .send()
        .unwrap();
    let pr_commit = proposal.commit_oid.unwrap();
    assert_eq!(repo.info().send().unwrap().sha.unwrap(), main, "main moved");
    assert_eq!(
        repo.info()
            .revision("refs/pr/1")
            .send()
            .unwrap()
            .sha
            .unwrap(),
        pr_commit
    );
    let file = repo
        .download_file()
        .filename("config.json")
        .revision("refs/pr/1")
        .send()
        .unwrap();
    assert_eq!(std::fs::read(file).unwrap(), b"{\"v\": 2}");
    assert!(server
        .requests()
        .contains(&"POST /api/models/org/pr/commit/main?create_pr=1 [auth]".to_owned()));
}

#[test]
fn a_required_token_is_enforced_except_on_storage_urls() {
    let dir = tempfile::tempdir().unwrap();
    let server = HubServer::start(&dir.path().join("hub"));
    let model_bytes = noise(MODEL_SIZE, 3);
    server.add_file("org/private", "model.safetensors", &model_bytes);
    server.faults().require_token("hf_required_secret");

    // Without a token (or with one found in the environment, which is not this one).
    let anonymous = client(&server, &dir.path().join("anonymous"), None);
    let denied = model(&anonymous, "org/private")
        .download_file()
        .filename("model.safetensors")
        .send();
    assert!(
        matches!(denied, Err(HFError::AuthRequired { .. })),
        "{denied:?}"
    );
    let wrong = client(&server, &dir.path().join("wrong"), Some(TOKEN));
    let denied = model(&wrong, "org/private").info().send();
    assert!(
        matches!(denied, Err(HFError::AuthRequired { .. })),
        "{denied:?}"
    );

    let allowed = client(
        &server,
        &dir.path().join("allowed"),
        Some("hf_required_secret"),
    );
    assert_eq!(allowed.whoami().send().unwrap().username, "zoo");
    let before = server.requests().len();
    let file = model(&allowed, "org/private")
        .download_file()
        .filename("model.safetensors")
        .send()
        .unwrap();
    assert_eq!(std::fs::read(file).unwrap(), model_bytes);
    // hf-hub drops the token when redirected to the storage origin, which needs none.
    let requests = requests_since(&server, before);
    let sha = sha256_hex(&model_bytes);
    assert_eq!(
        requests,
        [
            "HEAD /org/private/resolve/main/model.safetensors [auth]".to_owned(),
            "GET /org/private/resolve/main/model.safetensors [auth]".to_owned(),
            format!("GET /lfs/{sha}/model.safetensors"),
        ]
    );
}

#[test]
fn transient_failures_are_retried_by_hf_hub() {
    let dir = tempfile::tempdir().unwrap();
    let server = HubServer::start(&dir.path().join("hub"));
    server.add_file("org/flaky", "config.json", b"{}");
    let client = client(&server, &dir.path().join("cache"), Some(TOKEN));

    let before = server.requests().len();
    server.faults().fail_next(2, 503);
    model(&client, "org/flaky")
        .info()
        .send()
        .expect("retried until it succeeds");
    assert_eq!(
        requests_since(&server, before),
        vec!["GET /api/models/org/flaky [auth]"; 3]
    );

    let before = server.requests().len();
    server.faults().fail_next(2, 500);
    let file = model(&client, "org/flaky")
        .download_file()
        .filename("config.json")
        .send()
        .unwrap();
    assert_eq!(std::fs::read(file).unwrap(), b"{}");
    let requests = requests_since(&server, before);
    assert_eq!(
        requests[..3],
        vec!["HEAD /org/flaky/resolve/main/config.json [auth]"; 3]
    );
}

#[test]
fn truncated_downloads_fail_in_hf_hub_and_restart_from_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let server = HubServer::start(&dir.path().join("hub"));
    let text = noise(300_000, 4)
        .iter()
        .map(|byte| b'a' + byte % 26)
        .collect::<Vec<u8>>();
    let files = [
        ("model.safetensors", noise(MODEL_SIZE, 5)),
        ("notes.txt", text),
    ];
    for (path, bytes) in &files {
        server.add_file("org/cut", path, bytes);
    }
    let cache = dir.path().join("cache");
    let client = client(&server, &cache, Some(TOKEN));
    let blobs = repo_cache(&cache, "org/cut").join("blobs");

    for (path, bytes) in &files {
        server.faults().truncate(*path);
        let cut = model(&client, "org/cut")
            .download_file()
            .filename(*path)
            .send();
        assert!(
            matches!(cut, Err(HFError::Request { .. })),
            "{path}: {cut:?}"
        );
        // What arrived stays as `{etag}.incomplete`; no blob, no snapshot entry.
        let incomplete: Vec<PathBuf> = std::fs::read_dir(&blobs)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|blob| {
                blob.extension()
                    .is_some_and(|extension| extension == "incomplete")
            })
            .collect();
        assert_eq!(incomplete.len(), 1, "{incomplete:?}");
        assert_eq!(
            std::fs::metadata(&incomplete[0]).unwrap().len(),
            bytes.len() as u64 / 2
        );

        server.faults().truncate(None);
        let file = model(&client, "org/cut")
            .download_file()
            .filename(*path)
            .send()
            .unwrap();
        assert_eq!(&std::fs::read(file).unwrap(), bytes);
        assert!(
            !incomplete[0].exists(),
            "the partial download became the blob"
        );
    }
}

/// hf-hub 1.0 does not check the SHA-256 of what it downloads (nor its size): a corrupted LFS
/// file lands in the cache under its expected name, and is served from there afterwards.
#[test]
fn corrupted_lfs_downloads_are_not_detected_by_hf_hub() {
    let dir = tempfile::tempdir().unwrap();
    let server = HubServer::start(&dir.path().join("hub"));
    let original = noise(MODEL_SIZE, 6);
    server.add_file("org/rot", "model.safetensors", &original);
    let cache = dir.path().join("cache");
    let client = client(&server, &cache, Some(TOKEN));
    let repo = model(&client, "org/rot");

    server.faults().corrupt("model.safetensors");
    let file = repo
        .download_file()
        .filename("model.safetensors")
        .send()
        .expect("no error from hf-hub");
    let received = std::fs::read(&file).unwrap();
    let flipped = received
        .iter()
        .zip(&original)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!((received.len(), flipped), (original.len(), 1));
    let blob = repo_cache(&cache, "org/rot")
        .join("blobs")
        .join(sha256_hex(&original));
    assert_eq!(
        std::fs::read(&blob).unwrap(),
        received,
        "cached under the original's SHA-256"
    );

    server.faults().corrupt(None);
    let again = repo
        .download_file()
        .filename("model.safetensors")
        .send()
        .unwrap();
    assert_eq!(
        std::fs::read(&again).unwrap(),
        received,
        "still served from the cache"
    );
    let forced = repo
        .download_file()
        .filename("model.safetensors")
        .force_download(true)
        .send()
        .unwrap();
    assert_eq!(std::fs::read(forced).unwrap(), original);
}

/// hf-hub 1.0 does not check the status of the `GET` that follows a good `HEAD`: when the
/// storage has lost an LFS object, the `404`'s JSON body is cached as the file.
#[test]
fn hf_hub_caches_the_error_body_of_a_failed_download() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("hub");
    let server = HubServer::start(&store);
    let original = noise(MODEL_SIZE, 10);
    server.add_file("org/lost", "model.safetensors", &original);
    // The server's layout (see its module): contents under `blobs/{sha256}`.
    std::fs::remove_file(store.join("blobs").join(sha256_hex(&original))).unwrap();
    let client = client(&server, &dir.path().join("cache"), Some(TOKEN));

    let file = model(&client, "org/lost")
        .download_file()
        .filename("model.safetensors")
        .send();
    let received = std::fs::read(file.expect("no error from hf-hub")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&received),
        r#"{"error":"No such object"}"#
    );
}

/// The Python interpreter `ZOO_HUB_PYTHON` names (with `huggingface_hub`); `None` skips the
/// test, except on CI, which must provide it.
fn python() -> Option<PathBuf> {
    match std::env::var_os("ZOO_HUB_PYTHON") {
        Some(python) => Some(python.into()),
        None if std::env::var_os("CI").is_some() => {
            panic!("CI must set ZOO_HUB_PYTHON to a python with huggingface_hub")
        }
        None => {
            println!("skipped: set ZOO_HUB_PYTHON to a python with huggingface_hub");
            None
        }
    }
}

/// Runs tests/support/hub_python.py `args` against `server` (HF_HOME in `home`), returning the
/// JSON it prints.
fn run_python(python: &Path, server: &HubServer, home: &Path, args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/support/hub_python.py");
    let output = Command::new(python)
        .arg(script)
        .args(args)
        .env("HF_ENDPOINT", server.url())
        .env("HF_TOKEN", TOKEN)
        .env("HF_HOME", home)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("HF_TOKEN_PATH")
        .output()
        .expect("run hub_python.py");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "hub_python.py {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last_line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last_line)
        .unwrap_or_else(|e| panic!("hub_python.py printed {stdout:?}: {e}"))
}

/// The `files` part of a Python download report: path to SHA-256.
fn expected_report(files: &[(String, Vec<u8>)]) -> Value {
    files
        .iter()
        .map(|(path, bytes)| (path.clone(), Value::String(sha256_hex(bytes))))
        .collect()
}

/// Runs `hub_python.py download` for `repo`, checking it gets `files` at `commit`.
fn download_with_python(
    python: &Path,
    server: &HubServer,
    home: &Path,
    repo: &str,
    files: &[(String, Vec<u8>)],
    commit: &str,
) {
    let cache = home.join("cache");
    let report = run_python(
        python,
        server,
        home,
        &["download", repo, cache.to_str().unwrap()],
    );
    assert_eq!(report["files"], expected_report(files));
    assert_eq!(report["commit"], commit);
    assert_eq!(
        std::fs::read_to_string(repo_cache(&cache, repo).join("refs/main")).unwrap(),
        commit
    );
}

#[test]
fn python_client_uploads_and_downloads() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = HubServer::start(&dir.path().join("hub"));
    let folder = dir.path().join("folder");
    let files = sample_files(7);
    write_folder(&folder, &files);

    let uploaded = run_python(
        &python,
        &server,
        dir.path(),
        &["upload", "org/python", folder.to_str().unwrap()],
    );
    let commit = uploaded["commit"].as_str().expect("a commit id").to_owned();
    let requests = server.requests();
    let sha = sha256_hex(&files[3].1);
    for expected in [
        "POST /api/repos/create [auth]".to_owned(),
        "POST /api/validate-yaml [auth]".to_owned(),
        "POST /api/models/org/python/preupload/main [auth]".to_owned(),
        "POST /org/python.git/info/lfs/objects/batch [auth]".to_owned(),
        format!("PUT /lfs/{sha}?size={MODEL_SIZE}"),
        "POST /org/python.git/info/lfs/objects/verify [auth]".to_owned(),
        "POST /api/models/org/python/commit/main [auth]".to_owned(),
    ] {
        assert!(
            requests.contains(&expected),
            "no {expected} in {requests:#?}"
        );
    }

    download_with_python(&python, &server, dir.path(), "org/python", &files, &commit);
}

#[test]
fn each_client_downloads_what_the_other_uploaded() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = HubServer::start(&dir.path().join("hub"));
    let cache = dir.path().join("rust-cache");
    let client = client(&server, &cache, Some(TOKEN));

    let from_rust = sample_files(8);
    write_folder(&dir.path().join("from-rust"), &from_rust);
    let commit = upload_with_hf_hub(&client, "org/from-rust", &dir.path().join("from-rust"));
    download_with_python(
        &python,
        &server,
        dir.path(),
        "org/from-rust",
        &from_rust,
        &commit,
    );

    let from_python = sample_files(9);
    let folder = dir.path().join("from-python");
    write_folder(&folder, &from_python);
    let uploaded = run_python(
        &python,
        &server,
        dir.path(),
        &["upload", "org/from-python", folder.to_str().unwrap()],
    );
    let commit = uploaded["commit"].as_str().expect("a commit id");
    download_with_hf_hub(&client, &cache, "org/from-python", &from_python, commit);
}
