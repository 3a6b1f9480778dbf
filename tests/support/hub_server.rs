//! A Hugging Face Hub server for tests, on loopback.
//!
//! [`HubServer`] speaks enough of the Hub's HTTP protocol for both the Rust `hf-hub` crate and
//! Python's `huggingface_hub` to create model repos (`org/name`), commit files to them (inline or
//! through git-LFS "basic" transfers) and download them into their caches.
//!
//! Like the real Hub it serves two origins. The hub origin ([`HubServer::url`]) answers the API,
//! the `resolve` URLs and the git-LFS batch API. A second, storage origin (another port) stands in
//! for the CDN and S3: a git-LFS file `resolve`s to a `302` towards it, and git-LFS uploads `PUT`
//! to it. Its URLs play the part of pre-signed URLs: they need no token, and both clients drop
//! their `Authorization` header when they leave the hub's origin.
//!
//! Repos, commits and file contents live under the directory the server is started on, each file
//! written under a temporary name and then renamed into place, so that a server restarted on the
//! same directory serves everything again. [`Faults`] injects failures for error-path tests.
//!
//! Layout of the directory:
//! - `blobs/{sha256}`: file contents, regular and LFS alike, addressed by their SHA-256;
//! - `repos/{org}/{name}/repo.json`: visibility, creation date, refs (branches, `refs/pr/N`);
//! - `repos/{org}/{name}/commits/{id}.json`: each commit with its full file list;
//! - `tmp/`: files being written.
//!
//! Tests and the `hub_server` example include this file with `#[path = ...] mod hub_server;`
//! (with `#[allow(dead_code)]` when they use only part of it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// Extensions the Hub's default `.gitattributes` routes to git-LFS (the binary formats among
/// them), plus the zoo's own model format.
const LFS_EXTENSIONS: &[&str] = &[
    "7z",
    "arrow",
    "bin",
    "bz2",
    "ckpt",
    "gz",
    "h5",
    "joblib",
    "msgpack",
    "npy",
    "npz",
    "onnx",
    "ot",
    "parquet",
    "pb",
    "pickle",
    "pkl",
    "pt",
    "pth",
    "rar",
    "safetensors",
    "tar",
    "tflite",
    "tgz",
    "xz",
    "zip",
    "zoo",
    "zst",
];

/// Files at least this large go to git-LFS whatever their name, as on the Hub.
const LFS_MIN_SIZE: u64 = 10 * 1024 * 1024;

/// A running Hub: the hub and storage origins on 127.0.0.1, and the repos they serve.
///
/// Dropping it stops both listeners and closes their open connections.
pub struct HubServer {
    hub: Arc<Hub>,
    /// The listeners of the two origins, which stop when dropped.
    _api: Listener,
    _storage: Listener,
}

impl HubServer {
    /// Starts a server on an ephemeral port, storing repos under `dir`.
    ///
    /// # Panics
    /// When it cannot bind a port or create its directories.
    pub fn start(dir: &Path) -> HubServer {
        HubServer::start_on(dir, 0).expect("start the test hub server")
    }

    /// Starts a server whose hub origin listens on 127.0.0.1:`port` (0: any free port), storing
    /// repos under `dir` (created if missing; what an earlier server left there is served).
    pub fn start_on(dir: &Path, port: u16) -> io::Result<HubServer> {
        let api = TcpListener::bind(("127.0.0.1", port))?;
        let storage = TcpListener::bind(("127.0.0.1", 0))?;
        let hub = Arc::new(Hub {
            store: Store::open(dir)?,
            faults: Faults::default(),
            log: Mutex::new(Vec::new()),
            url: format!("http://{}", api.local_addr()?),
            storage_url: format!("http://{}", storage.local_addr()?),
        });
        Ok(HubServer {
            _api: Listener::spawn(api, Origin::Hub, Arc::clone(&hub))?,
            _storage: Listener::spawn(storage, Origin::Storage, Arc::clone(&hub))?,
            hub,
        })
    }

    /// The hub's URL, `http://127.0.0.1:PORT`: what `HF_ENDPOINT` or a client's endpoint is set to.
    pub fn url(&self) -> String {
        self.hub.url.clone()
    }

    /// The fault injection knobs, settable at any time.
    pub fn faults(&self) -> &Faults {
        &self.hub.faults
    }

    /// Every request received so far, on both origins, in order: `"METHOD /path?query"` as sent
    /// (still percent-encoded), followed by `" [auth]"` when it carried an `Authorization` header
    /// (never the token itself).
    pub fn requests(&self) -> Vec<String> {
        lock(&self.hub.log).clone()
    }

    /// Commits `bytes` as `path` on the `main` branch of `repo` (`org/name`), creating the repo
    /// first (public) if needed. Files are routed to git-LFS as uploads are.
    ///
    /// # Panics
    /// On an invalid repo id or path, or when the store cannot be written.
    pub fn add_file(&self, repo: &str, path: &str, bytes: &[u8]) {
        let added = self.hub.add_file(repo, path, bytes);
        if let Err(response) = added {
            let error = String::from_utf8_lossy(&response.body);
            panic!("cannot add {path} to {repo}: {} {error}", response.status);
        }
    }
}

/// Failures to inject, all off by default. Each setter replaces the previous setting.
#[derive(Default)]
pub struct Faults {
    token: Mutex<Option<String>>,
    /// Requests still to fail, and the status they get.
    failures: Mutex<(u32, u16)>,
    truncate: Mutex<Option<String>>,
    corrupt: Mutex<Option<String>>,
}

impl Faults {
    /// Requires `Authorization: Bearer {token}` on every request to the hub origin (storage URLs
    /// stand for pre-signed ones and need none): others get the Hub's `401`. `None`, the default,
    /// accepts any token or none.
    pub fn require_token<'a>(&self, token: impl Into<Option<&'a str>>) {
        *lock(&self.token) = token.into().map(str::to_owned);
    }

    /// Answers the next `n` requests, on either origin, with `status` and a JSON error.
    pub fn fail_next(&self, n: u32, status: u16) {
        *lock(&self.failures) = (n, status);
    }

    /// Makes every `GET` of a file whose path ends with `path_suffix` (through `resolve` or a
    /// storage URL) announce its full `Content-Length` but close the connection after half the
    /// body. `None` turns it off.
    pub fn truncate<'a>(&self, path_suffix: impl Into<Option<&'a str>>) {
        *lock(&self.truncate) = path_suffix.into().map(str::to_owned);
    }

    /// Makes every `GET` of a file whose path ends with `path_suffix` serve its bytes with the
    /// middle one flipped, headers (sizes, ETags) unchanged. `None` turns it off.
    pub fn corrupt<'a>(&self, path_suffix: impl Into<Option<&'a str>>) {
        *lock(&self.corrupt) = path_suffix.into().map(str::to_owned);
    }

    /// The status of an injected failure due now, if any.
    fn take_failure(&self) -> Option<u16> {
        let mut failures = lock(&self.failures);
        let (remaining, status) = *failures;
        (remaining > 0).then(|| {
            failures.0 -= 1;
            status
        })
    }

    /// The Hub's `401` when a token is required and `request` lacks it.
    fn check_token(&self, request: &Request) -> Result<(), Response> {
        let Some(token) = lock(&self.token).clone() else {
            return Ok(());
        };
        match request.header("authorization") {
            Some(value) if value.strip_prefix("Bearer ") == Some(token.as_str()) => Ok(()),
            Some(_) => Err(error(
                401,
                None,
                "Invalid credentials in Authorization header",
            )),
            None => Err(error(401, None, "Invalid username or password.")),
        }
    }

    /// Applies the truncate and corrupt faults to a response serving the file at `path`.
    fn damage(&self, path: &str, response: &mut Response) {
        let matches = |setting: &Mutex<Option<String>>| {
            lock(setting)
                .as_deref()
                .is_some_and(|suffix| path.ends_with(suffix))
        };
        if matches(&self.corrupt) && !response.body.is_empty() {
            let middle = response.body.len() / 2;
            response.body[middle] ^= 0xff;
        }
        response.truncate = matches(&self.truncate);
    }
}

/// The server's state, shared by the connection threads: storage, faults and request log.
struct Hub {
    store: Store,
    faults: Faults,
    log: Mutex<Vec<String>>,
    url: String,
    storage_url: String,
}

/// An endpoint's answer, or the error response that ends it early.
type Reply = Result<Response, Response>;

impl Hub {
    /// Logs `request`, applies the faults and answers it.
    fn handle(&self, origin: Origin, request: &Request) -> Response {
        let auth = if request.header("authorization").is_some() {
            " [auth]"
        } else {
            ""
        };
        lock(&self.log).push(format!("{} {}{auth}", request.method, request.target));
        if let Some(status) = self.faults.take_failure() {
            return error(status, None, "Injected failure");
        }
        let reply = match origin {
            Origin::Hub => self
                .faults
                .check_token(request)
                .and_then(|()| self.route_hub(request)),
            Origin::Storage => self.route_storage(request),
        };
        let mut response = reply.unwrap_or_else(|response| response);
        if response.serves_file && request.method == "GET" {
            self.faults.damage(&request.path.join("/"), &mut response);
        }
        response
    }

    /// Dispatches a request to the hub origin to its endpoint.
    fn route_hub(&self, request: &Request) -> Reply {
        let segments: Vec<&str> = request.path.iter().map(String::as_str).collect();
        match (request.method.as_str(), segments.as_slice()) {
            ("POST", ["api", "repos", "create"]) => self.create_repo(request),
            ("GET", ["api", "whoami-v2"]) => Ok(whoami(request)),
            ("POST", ["api", "validate-yaml"]) => {
                Ok(Response::json(200, &json!({"errors": [], "warnings": []})))
            }
            ("GET", ["api", "models", org, name]) => {
                self.model_info(&repo_id(org, name)?, "main", request)
            }
            ("GET", ["api", "models", org, name, "revision", revision @ ..]) => {
                self.model_info(&repo_id(org, name)?, &revision.join("/"), request)
            }
            ("GET", ["api", "models", org, name, "tree", rest @ ..]) => {
                let (revision, path) = split_revision(rest)?;
                self.tree(&repo_id(org, name)?, &revision, &path, request)
            }
            ("POST", ["api", "models", org, name, "preupload", revision @ ..]) => {
                self.preupload(&repo_id(org, name)?, &revision.join("/"), request)
            }
            ("POST", ["api", "models", org, name, "commit", revision @ ..]) => {
                self.commit(&repo_id(org, name)?, &revision.join("/"), request)
            }
            ("POST", [org, git, "info", "lfs", "objects", "batch"]) => {
                self.lfs_batch(&git_repo_id(org, git)?, request)
            }
            ("POST", [org, git, "info", "lfs", "objects", "verify"]) => {
                self.lfs_verify(&git_repo_id(org, git)?, request)
            }
            ("GET" | "HEAD", [org, name, "resolve", rest @ ..]) => {
                let (revision, path) = split_revision(rest)?;
                self.resolve(&repo_id(org, name)?, &revision, &path, request)
            }
            _ => Err(error(404, None, "Not Found")),
        }
    }

    /// Dispatches a request to the storage origin to its endpoint.
    fn route_storage(&self, request: &Request) -> Reply {
        let segments: Vec<&str> = request.path.iter().map(String::as_str).collect();
        match (request.method.as_str(), segments.as_slice()) {
            ("PUT", ["lfs", oid]) => self.upload_object(oid, request),
            ("GET" | "HEAD", ["lfs", oid, ..]) => self.download_object(oid, request),
            _ => Err(error(404, None, "Not Found")),
        }
    }

    /// `POST /api/repos/create`: creates a model repo whose `main` branch holds an empty commit.
    fn create_repo(&self, request: &Request) -> Reply {
        #[derive(Deserialize)]
        struct CreateRepo {
            name: String,
            organization: Option<String>,
            #[serde(rename = "type")]
            repo_type: Option<String>,
            #[serde(default)]
            private: bool,
            visibility: Option<String>,
        }
        let body: CreateRepo = request.json()?;
        if body
            .repo_type
            .as_deref()
            .is_some_and(|kind| kind != "model")
        {
            return Err(error(400, None, "This server only hosts model repos"));
        }
        let Some(org) = body.organization else {
            return Err(error(
                400,
                None,
                "Repo ids on this server are org/name: set organization",
            ));
        };
        let repo = repo_id(&org, &body.name).map_err(|_| error(400, None, "Invalid repo name"))?;
        let private = body.private || body.visibility.is_some_and(|v| v != "public");
        let _writing = self.store.lock();
        if self.store.repo(&repo).is_ok() {
            return Err(error(409, None, "You already created this model repo"));
        }
        self.store.create_repo(&repo, private).map_err(internal)?;
        let url = format!("{}/{repo}", self.url);
        Ok(Response::json(
            200,
            &json!({"url": url, "name": repo, "id": repo}),
        ))
    }

    /// `GET /api/models/{repo}[/revision/{rev}]`: the repo's metadata at a revision, with its files
    /// as `siblings` (with sizes, blob ids and LFS details when `blobs=true`).
    fn model_info(&self, repo: &str, revision: &str, request: &Request) -> Reply {
        let (meta, commit) = self.store.resolve(repo, revision)?;
        let with_blobs = request.flag("blobs");
        let siblings: Vec<Value> = commit
            .files
            .iter()
            .map(|(path, file)| {
                let mut sibling = json!({"rfilename": path});
                if with_blobs {
                    sibling["size"] = json!(file.size);
                    sibling["blobId"] = json!(file.oid);
                    if file.lfs {
                        let pointer_size = lfs_pointer(&file.sha256, file.size).len();
                        sibling["lfs"] = json!({"sha256": file.sha256, "size": file.size, "pointerSize": pointer_size});
                    }
                }
                sibling
            })
            .collect();
        let author = repo.split('/').next().unwrap_or_default();
        Ok(Response::json(
            200,
            &json!({
                "_id": &hex_digest::<Sha1>(repo.as_bytes())[..24],
                "id": repo,
                "modelId": repo,
                "author": author,
                "sha": commit.id,
                "lastModified": commit.date,
                "createdAt": meta.created_at,
                "private": meta.private,
                "disabled": false,
                "gated": false,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "spaces": [],
                "usedStorage": commit.files.values().map(|file| file.size).sum::<u64>(),
            }),
        ))
    }

    /// `GET /api/models/{repo}/tree/{rev}[/{path}]`: the directories and files under `path`,
    /// at any depth when `recursive` is set (one page: no `Link` header).
    fn tree(&self, repo: &str, revision: &str, path: &str, request: &Request) -> Reply {
        let (_, commit) = self.store.resolve(repo, revision)?;
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        let recursive = request.flag("recursive");
        let mut directories = BTreeSet::new();
        let mut files = Vec::new();
        for (file_path, file) in &commit.files {
            let Some(relative) = file_path.strip_prefix(&prefix) else {
                continue;
            };
            let parts: Vec<&str> = relative.split('/').collect();
            let depth = if recursive {
                parts.len() - 1
            } else {
                (parts.len() - 1).min(1)
            };
            for end in 1..=depth {
                directories.insert(format!("{prefix}{}", parts[..end].join("/")));
            }
            if recursive || parts.len() == 1 {
                files.push(tree_file(file_path, file));
            }
        }
        if !path.is_empty() && files.is_empty() && directories.is_empty() {
            return Err(entry_not_found(&commit.id));
        }
        let mut entries: Vec<Value> = directories
            .iter()
            .map(|directory| {
                let oid = directory_oid(&commit, directory);
                json!({"type": "directory", "oid": oid, "size": 0, "path": directory})
            })
            .collect();
        entries.extend(files);
        Ok(Response::json(200, &Value::Array(entries)))
    }

    /// `POST /api/models/{repo}/preupload/{rev}`: whether each file is to be uploaded inline
    /// (`regular`) or through git-LFS, with the `oid` of the file already at that path, if any
    /// (SHA-256 for LFS files, git blob id otherwise), which clients use to skip unchanged files.
    fn preupload(&self, repo: &str, revision: &str, request: &Request) -> Reply {
        #[derive(Deserialize)]
        struct Preupload {
            files: Vec<PreuploadFile>,
        }
        #[derive(Deserialize)]
        struct PreuploadFile {
            path: String,
            size: u64,
        }
        let body: Preupload = request.json()?;
        let (_, head) = self.store.resolve(repo, revision)?;
        let files: Vec<Value> = body
            .files
            .iter()
            .map(|file| {
                let mode = if is_lfs(&file.path, file.size) {
                    "lfs"
                } else {
                    "regular"
                };
                let mut answer =
                    json!({"path": file.path, "uploadMode": mode, "shouldIgnore": false});
                if let Some(existing) = head.files.get(&file.path) {
                    answer["oid"] = json!(if existing.lfs {
                        &existing.sha256
                    } else {
                        &existing.oid
                    });
                }
                answer
            })
            .collect();
        Ok(Response::json(
            200,
            &json!({"files": files, "commitOid": head.id}),
        ))
    }

    /// `POST /api/models/{repo}/commit/{branch}`: applies an NDJSON commit (a `header` line, then
    /// `file`, `lfsFile`, `deletedFile` and `deletedFolder` lines) on top of `branch`, or, with
    /// `create_pr=1`, on a new `refs/pr/N` branched from it.
    fn commit(&self, repo: &str, branch: &str, request: &Request) -> Reply {
        let (header, changes) = self.parse_commit(&request.body)?;
        let create_pr = request.flag("create_pr");
        let _writing = self.store.lock();
        let mut meta = self.store.repo(repo)?;
        let head = meta
            .refs
            .get(branch)
            .cloned()
            .ok_or_else(|| revision_not_found(branch))?;
        let base = match header.parent_commit.as_deref() {
            None => head,
            Some(parent) if parent.len() >= 7 && head.starts_with(parent) => head,
            Some(parent) if create_pr && is_commit_id(parent) => parent.to_owned(),
            Some(parent) => {
                let message =
                    format!("A commit has happened since {parent}. Please refresh and try again.");
                return Err(error(412, None, &message));
            }
        };
        let parent = self
            .store
            .load_commit(repo, &base)
            .map_err(internal)?
            .ok_or_else(|| revision_not_found(&base))?;
        let target = if create_pr {
            meta.pull_requests += 1;
            format!("refs/pr/{}", meta.pull_requests)
        } else {
            branch.to_owned()
        };
        let commit = self
            .store
            .add_commit(repo, &mut meta, &target, &parent, &header, &changes)?;
        let mut body = json!({
            "success": true,
            "commitOid": commit.id,
            "commitUrl": format!("{}/{repo}/commit/{}", self.url, commit.id),
            "hookOutput": "",
        });
        if create_pr {
            body["pullRequestUrl"] = json!(format!(
                "{}/{repo}/discussions/{}",
                self.url, meta.pull_requests
            ));
        }
        Ok(Response::json(200, &body))
    }

    /// `POST /{repo}.git/info/lfs/objects/batch`: the git-LFS batch API, upload operation, `basic`
    /// transfer: an upload and a verify action for each object not stored yet.
    fn lfs_batch(&self, repo: &str, request: &Request) -> Reply {
        #[derive(Deserialize)]
        struct Batch {
            operation: String,
            #[serde(default)]
            transfers: Vec<String>,
            objects: Vec<LfsObject>,
        }
        self.store.repo(repo)?;
        let batch: Batch = request.json()?;
        if batch.operation != "upload" {
            return Err(error(422, None, "This server only accepts LFS uploads"));
        }
        if !batch.transfers.is_empty()
            && !batch.transfers.iter().any(|transfer| transfer == "basic")
        {
            return Err(error(
                422,
                None,
                "This server only offers the basic LFS transfer",
            ));
        }
        let verify = format!("{}/{repo}.git/info/lfs/objects/verify", self.url);
        let objects: Vec<Value> = batch
            .objects
            .iter()
            .map(|object| {
                let (oid, size) = (&object.oid, object.size);
                if !is_sha256(oid) {
                    json!({"oid": oid, "size": size, "error": {"code": 422, "message": "Invalid oid"}})
                } else if self.store.has_blob(oid, size) {
                    json!({"oid": oid, "size": size})
                } else {
                    let upload = format!("{}/lfs/{oid}?size={size}", self.storage_url);
                    json!({
                        "oid": oid,
                        "size": size,
                        "authenticated": true,
                        "actions": {
                            "upload": {"href": upload, "expires_in": 3600},
                            "verify": {"href": verify, "expires_in": 3600},
                        },
                    })
                }
            })
            .collect();
        let body = json!({"transfer": "basic", "objects": objects, "hash_algo": "sha256"});
        Ok(Response::json(200, &body).header("Content-Type", "application/vnd.git-lfs+json"))
    }

    /// `POST /{repo}.git/info/lfs/objects/verify`: whether an uploaded LFS object arrived whole.
    fn lfs_verify(&self, repo: &str, request: &Request) -> Reply {
        self.store.repo(repo)?;
        let object: LfsObject = request.json()?;
        if !is_sha256(&object.oid) || !self.store.has_blob(&object.oid, object.size) {
            return Err(error(404, None, "Object not found"));
        }
        Ok(Response::json(200, &json!({})))
    }

    /// `HEAD`/`GET /{repo}/resolve/{rev}/{path}`: a regular file's bytes (ETag: git blob id), or a
    /// `302` to the storage origin for an LFS file (`X-Linked-Etag`: its SHA-256); both with
    /// `X-Repo-Commit`.
    fn resolve(&self, repo: &str, revision: &str, path: &str, request: &Request) -> Reply {
        let (_, commit) = self.store.resolve(repo, revision)?;
        let file = commit
            .files
            .get(path)
            .ok_or_else(|| entry_not_found(&commit.id))?;
        if file.lfs {
            let location = format!(
                "{}/lfs/{}/{}",
                self.storage_url,
                file.sha256,
                percent_encode_path(path)
            );
            return Ok(Response::new(302)
                .header("Location", location)
                .header("ETag", quoted(&file.oid))
                .header("X-Linked-Etag", quoted(&file.sha256))
                .header("X-Linked-Size", file.size.to_string())
                .header("X-Repo-Commit", &commit.id));
        }
        let etag = quoted(&file.oid);
        if request.header("if-none-match") == Some(etag.as_str()) {
            return Ok(Response::new(304)
                .header("ETag", etag)
                .header("X-Repo-Commit", &commit.id));
        }
        let bytes = self.store.blob(&file.sha256)?;
        Ok(serve_bytes(bytes, request)?
            .header("ETag", etag)
            .header("X-Repo-Commit", &commit.id))
    }

    /// Storage origin, `PUT /lfs/{sha256}?size={size}`: stores an LFS object, checking its hash
    /// and size.
    fn upload_object(&self, oid: &str, request: &Request) -> Reply {
        let size = request
            .query
            .get("size")
            .and_then(|size| size.parse::<usize>().ok());
        if size.is_some_and(|size| size != request.body.len()) {
            return Err(error(
                400,
                None,
                "The object's size is not the announced one",
            ));
        }
        if hex_digest::<Sha256>(&request.body) != oid {
            return Err(error(400, None, "The object's SHA-256 is not its oid"));
        }
        self.store.put_blob(&request.body).map_err(internal)?;
        Ok(Response::new(200).header("ETag", quoted(oid)))
    }

    /// Storage origin, `HEAD`/`GET /lfs/{sha256}/{path}`: an LFS object's bytes (the path, there
    /// for the faults and for people reading logs, is not looked at).
    fn download_object(&self, oid: &str, request: &Request) -> Reply {
        if !is_sha256(oid) {
            return Err(error(404, None, "No such object"));
        }
        let bytes = self.store.blob(oid)?;
        Ok(serve_bytes(bytes, request)?.header("ETag", quoted(oid)))
    }

    /// Reads an NDJSON commit body into its header and changes, storing the inline contents.
    fn parse_commit(&self, body: &[u8]) -> Result<(CommitHeader, Vec<Change>), Response> {
        #[derive(Deserialize)]
        #[serde(tag = "key", content = "value", rename_all = "camelCase")]
        enum Line {
            Header(CommitHeader),
            File {
                path: String,
                content: String,
                encoding: Option<String>,
            },
            LfsFile {
                path: String,
                oid: String,
            },
            DeletedFile {
                path: String,
            },
            DeletedFolder {
                path: String,
            },
        }
        let mut header = None;
        let mut changes = Vec::new();
        for line in body
            .split(|&byte| byte == b'\n')
            .filter(|line| !line.trim_ascii().is_empty())
        {
            let line: Line = serde_json::from_slice(line)
                .map_err(|e| error(400, None, &format!("Invalid commit line: {e}")))?;
            match line {
                Line::Header(value) => header = Some(value),
                Line::File {
                    path,
                    content,
                    encoding,
                } => {
                    let bytes = match encoding.as_deref() {
                        Some("base64") => base64::engine::general_purpose::STANDARD
                            .decode(content)
                            .map_err(|e| {
                                error(400, None, &format!("Invalid base64 for {path}: {e}"))
                            })?,
                        _ => content.into_bytes(),
                    };
                    let sha256 = self.store.put_blob(&bytes).map_err(internal)?;
                    let file = FileEntry::new(&bytes, sha256, is_lfs(&path, bytes.len() as u64));
                    changes.push(Change::Put(checked_path(&path)?, file));
                }
                Line::LfsFile { path, oid } => {
                    let size = self.store.blob_size(&oid).ok_or_else(|| {
                        error(
                            422,
                            None,
                            &format!("LFS object {oid} of {path} was never uploaded"),
                        )
                    })?;
                    changes.push(Change::Put(checked_path(&path)?, FileEntry::lfs(oid, size)));
                }
                Line::DeletedFile { path } => changes.push(Change::Delete(checked_path(&path)?)),
                Line::DeletedFolder { path } => {
                    changes.push(Change::DeleteFolder(checked_path(
                        path.trim_end_matches('/'),
                    )?));
                }
            }
        }
        let header = header.ok_or_else(|| error(400, None, "The commit has no header line"))?;
        Ok((header, changes))
    }

    /// What [`HubServer::add_file`] does: a commit of one file on `main`, creating the repo if needed.
    fn add_file(&self, repo: &str, path: &str, bytes: &[u8]) -> Result<(), Response> {
        let (org, name) = repo.split_once('/').ok_or_else(repo_not_found)?;
        let repo = repo_id(org, name)?;
        let sha256 = self.store.put_blob(bytes).map_err(internal)?;
        let change = Change::Put(
            checked_path(path)?,
            FileEntry::new(bytes, sha256, is_lfs(path, bytes.len() as u64)),
        );
        let _writing = self.store.lock();
        if self.store.repo(&repo).is_err() {
            self.store.create_repo(&repo, false).map_err(internal)?;
        }
        let (mut meta, parent) = self.store.resolve(&repo, "main")?;
        let header = CommitHeader {
            summary: format!("Upload {path}"),
            description: String::new(),
            parent_commit: None,
        };
        self.store
            .add_commit(&repo, &mut meta, "main", &parent, &header, &[change])?;
        Ok(())
    }
}

/// `GET /api/whoami-v2`: a user for any token (the Hub's `401` without one).
fn whoami(request: &Request) -> Response {
    if request.header("authorization").is_none() {
        return error(401, None, "Invalid username or password.");
    }
    let token = json!({"displayName": "zoo-tests", "role": "write"});
    Response::json(
        200,
        &json!({
            "type": "user",
            "id": "0123456789abcdef01234567",
            "name": "zoo",
            "fullname": "Zoo Tests",
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": token},
        }),
    )
}

/// A `200` with `bytes`, or the `206` part of them a `Range: bytes=...` header asks for.
fn serve_bytes(bytes: Vec<u8>, request: &Request) -> Reply {
    let total = bytes.len();
    let mut response = match request.header("range") {
        None => Response::new(200).body(bytes),
        Some(range) => {
            let Some((start, end)) = parse_range(range, total) else {
                let unsatisfiable = error(416, None, "Requested range not satisfiable");
                return Err(unsatisfiable.header("Content-Range", format!("bytes */{total}")));
            };
            Response::new(206)
                .header("Content-Range", format!("bytes {start}-{end}/{total}"))
                .body(bytes[start..=end].to_vec())
        }
    };
    response.serves_file = true;
    Ok(response
        .header("Accept-Ranges", "bytes")
        .header("Content-Type", "application/octet-stream"))
}

/// The inclusive byte range a single-range `Range` header selects in `total` bytes.
fn parse_range(header: &str, total: usize) -> Option<(usize, usize)> {
    let (first, last) = header.strip_prefix("bytes=")?.trim().split_once('-')?;
    let (start, end) = match (first.parse::<usize>().ok(), last.parse::<usize>().ok()) {
        (Some(start), Some(end)) => (start, end.min(total.checked_sub(1)?)),
        (Some(start), None) if last.is_empty() => (start, total.checked_sub(1)?),
        (None, Some(suffix)) if first.is_empty() && suffix > 0 => {
            (total.saturating_sub(suffix), total.checked_sub(1)?)
        }
        _ => return None,
    };
    (start <= end).then_some((start, end))
}

/// Whether the Hub would store a file in git-LFS: a binary format, or large.
fn is_lfs(path: &str, size: u64) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    let extension = name
        .rsplit_once('.')
        .map(|(_, extension)| extension.to_ascii_lowercase());
    size > 0
        && (size >= LFS_MIN_SIZE
            || extension.is_some_and(|extension| LFS_EXTENSIONS.contains(&extension.as_str())))
}

/// The git-LFS pointer file git stores in place of an LFS file.
fn lfs_pointer(sha256: &str, size: u64) -> String {
    format!("version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n")
}

/// Git's object id for a blob holding `content`.
fn git_blob_id(content: &[u8]) -> String {
    let mut hasher = Sha1::new();
    hasher.update(format!("blob {}\0", content.len()));
    hasher.update(content);
    hex(&hasher.finalize())
}

/// A tree listing's file entry, with the `lfs` object for LFS files.
fn tree_file(path: &str, file: &FileEntry) -> Value {
    let mut entry = json!({"type": "file", "oid": file.oid, "size": file.size, "path": path});
    if file.lfs {
        let pointer_size = lfs_pointer(&file.sha256, file.size).len();
        entry["lfs"] = json!({"oid": file.sha256, "size": file.size, "pointerSize": pointer_size});
    }
    entry
}

/// A stable id for a directory of `commit` (a hash of what it holds; not git's tree id).
fn directory_oid(commit: &Commit, directory: &str) -> String {
    let prefix = format!("{directory}/");
    let mut listing = String::new();
    for (path, file) in commit
        .files
        .range(prefix.clone()..)
        .take_while(|(path, _)| path.starts_with(&prefix))
    {
        let _ = writeln!(listing, "{path} {}", file.oid);
    }
    hex_digest::<Sha1>(listing.as_bytes())
}

/// A file of a commit.
#[derive(Clone, Serialize, Deserialize)]
struct FileEntry {
    size: u64,
    /// SHA-256 of the contents, their name in the blob store.
    sha256: String,
    /// Git's blob id: of the contents, or of the LFS pointer for LFS files.
    oid: String,
    lfs: bool,
}

impl FileEntry {
    /// The entry of a file holding `bytes` (whose SHA-256 is `sha256`), in git-LFS or not.
    fn new(bytes: &[u8], sha256: String, lfs: bool) -> FileEntry {
        if lfs {
            FileEntry::lfs(sha256, bytes.len() as u64)
        } else {
            FileEntry {
                size: bytes.len() as u64,
                oid: git_blob_id(bytes),
                sha256,
                lfs: false,
            }
        }
    }

    /// The entry of an LFS file.
    fn lfs(sha256: String, size: u64) -> FileEntry {
        let oid = git_blob_id(lfs_pointer(&sha256, size).as_bytes());
        FileEntry {
            size,
            sha256,
            oid,
            lfs: true,
        }
    }
}

/// A commit: its id, parents, message, date and every file of the tree it records.
#[derive(Serialize, Deserialize)]
struct Commit {
    id: String,
    parents: Vec<String>,
    title: String,
    message: String,
    date: String,
    files: BTreeMap<String, FileEntry>,
}

impl Commit {
    /// A commit dated now, its id the SHA-1 of everything else in it.
    fn new(
        parents: Vec<String>,
        title: &str,
        message: &str,
        files: BTreeMap<String, FileEntry>,
    ) -> Commit {
        let date = now_iso8601();
        let content = json!({"parents": parents, "title": title, "message": message, "date": date, "files": files});
        Commit {
            id: hex_digest::<Sha1>(content.to_string().as_bytes()),
            parents,
            title: title.to_owned(),
            message: message.to_owned(),
            date,
            files,
        }
    }
}

/// The `header` line of an NDJSON commit.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CommitHeader {
    summary: String,
    #[serde(default)]
    description: String,
    parent_commit: Option<String>,
}

/// An object of the git-LFS batch and verify APIs.
#[derive(Deserialize)]
struct LfsObject {
    oid: String,
    size: u64,
}

/// One operation of a commit, its contents already stored.
enum Change {
    Put(String, FileEntry),
    Delete(String),
    DeleteFolder(String),
}

/// A repo's metadata: `repo.json`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RepoMeta {
    private: bool,
    created_at: String,
    /// Branch names and `refs/pr/N`, to commit ids.
    refs: BTreeMap<String, String>,
    /// Pull requests opened so far (the last `N`).
    pull_requests: u64,
}

/// The repos and file contents on disk.
struct Store {
    dir: PathBuf,
    /// Held while a repo's refs are read, changed and written back.
    writing: Mutex<()>,
    temporaries: AtomicU64,
}

impl Store {
    /// Opens (creating it if needed) the store in `dir`.
    fn open(dir: &Path) -> io::Result<Store> {
        for sub in ["blobs", "repos", "tmp"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        Ok(Store {
            dir: dir.to_owned(),
            writing: Mutex::new(()),
            temporaries: AtomicU64::new(0),
        })
    }

    /// Serializes the writers of refs.
    fn lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.writing)
    }

    fn repo_dir(&self, repo: &str) -> PathBuf {
        self.dir.join("repos").join(repo)
    }

    /// A repo's metadata, or the Hub's `RepoNotFound`.
    fn repo(&self, repo: &str) -> Result<RepoMeta, Response> {
        read_json(&self.repo_dir(repo).join("repo.json"))
            .map_err(internal)?
            .ok_or_else(repo_not_found)
    }

    /// Creates `repo` with an empty initial commit on `main` (the caller holds the lock).
    fn create_repo(&self, repo: &str, private: bool) -> io::Result<()> {
        let initial = Commit::new(Vec::new(), "initial commit", "", BTreeMap::new());
        self.save_commit(repo, &initial)?;
        let meta = RepoMeta {
            private,
            created_at: initial.date.clone(),
            refs: BTreeMap::from([("main".to_owned(), initial.id)]),
            pull_requests: 0,
        };
        self.save_repo(repo, &meta)
    }

    fn save_repo(&self, repo: &str, meta: &RepoMeta) -> io::Result<()> {
        self.write_atomically(
            &self.repo_dir(repo).join("repo.json"),
            &serde_json::to_vec_pretty(meta)?,
        )
    }

    /// The commit `id` of `repo`, if there is one.
    fn load_commit(&self, repo: &str, id: &str) -> io::Result<Option<Commit>> {
        if !is_commit_id(id) {
            return Ok(None);
        }
        read_json(
            &self
                .repo_dir(repo)
                .join("commits")
                .join(format!("{id}.json")),
        )
    }

    fn save_commit(&self, repo: &str, commit: &Commit) -> io::Result<()> {
        let path = self
            .repo_dir(repo)
            .join("commits")
            .join(format!("{}.json", commit.id));
        self.write_atomically(&path, &serde_json::to_vec_pretty(commit)?)
    }

    /// The repo and the commit `revision` (a ref or a commit id) names, or the Hub's
    /// `RepoNotFound` or `RevisionNotFound`.
    fn resolve(&self, repo: &str, revision: &str) -> Result<(RepoMeta, Commit), Response> {
        let meta = self.repo(repo)?;
        let id = meta.refs.get(revision).map_or(revision, String::as_str);
        let commit = self
            .load_commit(repo, id)
            .map_err(internal)?
            .ok_or_else(|| revision_not_found(revision))?;
        Ok((meta, commit))
    }

    /// Records a commit applying `changes` to `parent`, and points `target` (a ref) at it; the
    /// caller holds the lock.
    fn add_commit(
        &self,
        repo: &str,
        meta: &mut RepoMeta,
        target: &str,
        parent: &Commit,
        header: &CommitHeader,
        changes: &[Change],
    ) -> Result<Commit, Response> {
        let missing = |path: &str| {
            error(
                404,
                Some("EntryNotFound"),
                &format!("A file with this name doesn't exist: {path}"),
            )
        };
        let mut files = parent.files.clone();
        for change in changes {
            match change {
                Change::Put(path, file) => {
                    files.insert(path.clone(), file.clone());
                }
                Change::Delete(path) => {
                    files.remove(path).ok_or_else(|| missing(path))?;
                }
                Change::DeleteFolder(path) => {
                    let prefix = format!("{path}/");
                    let before = files.len();
                    files.retain(|file, _| !file.starts_with(&prefix));
                    if files.len() == before {
                        return Err(missing(path));
                    }
                }
            }
        }
        let commit = Commit::new(
            vec![parent.id.clone()],
            &header.summary,
            &header.description,
            files,
        );
        self.save_commit(repo, &commit).map_err(internal)?;
        meta.refs.insert(target.to_owned(), commit.id.clone());
        self.save_repo(repo, meta).map_err(internal)?;
        Ok(commit)
    }

    /// Stores `bytes` (if not stored yet) and returns their SHA-256.
    fn put_blob(&self, bytes: &[u8]) -> io::Result<String> {
        let sha256 = hex_digest::<Sha256>(bytes);
        let path = self.dir.join("blobs").join(&sha256);
        if !path.exists() {
            self.write_atomically(&path, bytes)?;
        }
        Ok(sha256)
    }

    /// The bytes stored under `sha256`, or a `404`.
    fn blob(&self, sha256: &str) -> Result<Vec<u8>, Response> {
        match std::fs::read(self.dir.join("blobs").join(sha256)) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(error(404, None, "No such object"))
            }
            Err(e) => Err(internal(e)),
        }
    }

    /// The size of the blob stored under `sha256`, if there is one.
    fn blob_size(&self, sha256: &str) -> Option<u64> {
        if !is_sha256(sha256) {
            return None;
        }
        std::fs::metadata(self.dir.join("blobs").join(sha256))
            .ok()
            .map(|metadata| metadata.len())
    }

    /// Whether a blob of `size` bytes is stored under `sha256`.
    fn has_blob(&self, sha256: &str, size: u64) -> bool {
        self.blob_size(sha256) == Some(size)
    }

    /// Writes `bytes` to `path` through a temporary file renamed into place.
    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let number = self.temporaries.fetch_add(1, Ordering::Relaxed);
        let temporary = self
            .dir
            .join("tmp")
            .join(format!("{}-{number}", std::process::id()));
        std::fs::write(&temporary, bytes)?;
        std::fs::rename(&temporary, path)
    }
}

/// Reads the JSON file at `path`, `None` if there is none.
fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// `org/name` from the two path segments, or `RepoNotFound` when they cannot name a repo.
fn repo_id(org: &str, name: &str) -> Result<String, Response> {
    let valid = |part: &str| {
        !part.is_empty()
            && part.len() <= 96
            && !part.starts_with(['.', '-'])
            && !part.ends_with('.')
            && !part.contains("..")
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if valid(org) && valid(name) {
        Ok(format!("{org}/{name}"))
    } else {
        Err(repo_not_found())
    }
}

/// The repo of a git URL's `{org}/{name}.git` segments.
fn git_repo_id(org: &str, git: &str) -> Result<String, Response> {
    repo_id(org, git.strip_suffix(".git").ok_or_else(repo_not_found)?)
}

/// Splits the segments after `tree/` or `resolve/` into the revision (`refs/pr/N` may come
/// unencoded) and the path within the repo.
fn split_revision(segments: &[&str]) -> Result<(String, String), Response> {
    let length = match segments {
        [] => return Err(error(404, None, "Not Found")),
        ["refs", _, _, ..] => 3,
        _ => 1,
    };
    Ok((segments[..length].join("/"), segments[length..].join("/")))
}

/// `path` if it is a relative path without empty, `.` or `..` segments, or a `400`.
fn checked_path(path: &str) -> Result<String, Response> {
    let valid = path
        .split('/')
        .all(|segment| !segment.is_empty() && segment != "." && segment != "..");
    if valid {
        Ok(path.to_owned())
    } else {
        Err(error(400, None, &format!("Invalid path in repo: {path:?}")))
    }
}

fn is_commit_id(text: &str) -> bool {
    text.len() == 40 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

fn quoted(text: &str) -> String {
    format!("\"{text}\"")
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut text, byte| {
            let _ = write!(text, "{byte:02x}");
            text
        })
}

fn hex_digest<D: Digest>(bytes: &[u8]) -> String {
    hex(&D::digest(bytes))
}

/// The current time as the Hub writes dates: `2024-05-01T12:34:56.789Z`.
fn now_iso8601() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = now.as_secs();
    let (year, month, day) = civil_date(seconds / 86_400);
    let time = seconds % 86_400;
    let (hour, minute, second) = (time / 3600, time % 3600 / 60, time % 60);
    let millis = now.subsec_millis();
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z")
}

/// The Gregorian date `days` after 1970-01-01, by counting 400-year eras of 146097 days from
/// 0000-03-01 (years starting in March put the leap day last).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let from_march_0000 = days + 719_468;
    let (era, day_of_era) = (from_march_0000 / 146_097, from_march_0000 % 146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

/// The Hub's error response: JSON `{"error": message}`, with the `X-Error-Message` header and,
/// when given, the `X-Error-Code` clients map to their exception types.
fn error(status: u16, code: Option<&str>, message: &str) -> Response {
    let response =
        Response::json(status, &json!({"error": message})).header("X-Error-Message", message);
    match code {
        Some(code) => response.header("X-Error-Code", code),
        None => response,
    }
}

fn repo_not_found() -> Response {
    error(404, Some("RepoNotFound"), "Repository not found")
}

fn revision_not_found(revision: &str) -> Response {
    error(
        404,
        Some("RevisionNotFound"),
        &format!("Invalid rev id: {revision}"),
    )
}

/// The `404` of a missing file, which names the commit looked at (clients cache the absence).
fn entry_not_found(commit: &str) -> Response {
    error(404, Some("EntryNotFound"), "Entry not found").header("X-Repo-Commit", commit)
}

fn internal(e: impl std::fmt::Display) -> Response {
    error(500, None, &format!("Internal error: {e}"))
}

/// Percent-encodes each segment of a repo path for use in a URL.
fn percent_encode_path(path: &str) -> String {
    let mut encoded = String::with_capacity(path.len());
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

/// Decodes `%XX` escapes (and `+` as a space in query strings).
fn percent_decode(text: &str, plus_is_space: bool) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match (bytes[i], escaped) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                i += 3;
                continue;
            }
            (b'+', _) if plus_is_space => decoded.push(b' '),
            (byte, _) => decoded.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Locks `mutex`, going on after a panic of another holder (the data stays usable).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Which origin a listener serves.
#[derive(Clone, Copy)]
enum Origin {
    /// API, `resolve` URLs and git-LFS API: what clients are pointed at.
    Hub,
    /// LFS objects: the CDN and S3 of the real Hub.
    Storage,
}

/// A parsed HTTP/1.1 request.
struct Request {
    method: String,
    /// The request target as sent (path and query, percent-encoded).
    target: String,
    /// The path's segments, decoded (an encoded `/` stays within its segment).
    path: Vec<String>,
    query: HashMap<String, String>,
    /// Header names in lowercase.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
}

impl Request {
    /// Reads the next request on a connection, `None` when the client closed it.
    fn read(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
        let mut line = String::new();
        while line.trim().is_empty() {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(None);
            }
        }
        let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP request");
        let mut words = line.split_whitespace();
        let (Some(method), Some(target), Some(version)) =
            (words.next(), words.next(), words.next())
        else {
            return Err(malformed());
        };
        let (method, target, version) = (method.to_owned(), target.to_owned(), version.to_owned());
        let mut headers = Vec::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(malformed());
            }
            let header = line.trim_end_matches(['\r', '\n']);
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').ok_or_else(malformed)?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let find = |name: &str| {
            headers
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.to_ascii_lowercase())
        };
        let body = if find("transfer-encoding").is_some_and(|encoding| encoding.contains("chunked"))
        {
            read_chunked(reader)?
        } else {
            let length = find("content-length").map_or(Ok(0), |length| {
                length.parse::<usize>().map_err(|_| malformed())
            })?;
            let mut body = vec![0; length];
            reader.read_exact(&mut body)?;
            body
        };
        let keep_alive = match find("connection") {
            Some(connection) if connection.contains("close") => false,
            Some(connection) if connection.contains("keep-alive") => true,
            _ => version == "HTTP/1.1",
        };
        let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
        let path = path
            .split('/')
            .filter(|segment| !segment.is_empty())
            .map(|segment| percent_decode(segment, false))
            .collect();
        let query = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(key, true), percent_decode(value, true))
            })
            .collect();
        Ok(Some(Request {
            method,
            target,
            path,
            query,
            headers,
            body,
            keep_alive,
        }))
    }

    /// The value of the header `name` (lowercase).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Whether the query parameter `name` is set to a true value (`1`, `true`, `True`).
    fn flag(&self, name: &str) -> bool {
        self.query
            .get(name)
            .is_some_and(|value| matches!(value.as_str(), "1" | "true" | "True"))
    }

    /// The body parsed as JSON, or a `400`.
    fn json<T: DeserializeOwned>(&self) -> Result<T, Response> {
        serde_json::from_slice(&self.body)
            .map_err(|e| error(400, None, &format!("Invalid JSON body: {e}")))
    }
}

/// Reads a body sent with `Transfer-Encoding: chunked`.
fn read_chunked(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed chunked body");
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| malformed())?;
        if size == 0 {
            // Trailers, up to the empty line.
            while reader.read_line(&mut line)? > 0 && !line.trim().is_empty() {
                line.clear();
            }
            return Ok(body);
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        line.clear();
        reader.read_line(&mut line)?;
    }
}

/// An HTTP response; `Content-Length` is that of `body` (also for `HEAD`, which gets no body).
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Whether the body is a file's contents (which the truncate and corrupt faults act on).
    serves_file: bool,
    /// Whether to send half the body and then close the connection (the truncate fault).
    truncate: bool,
}

impl Response {
    fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            serves_file: false,
            truncate: false,
        }
    }

    fn json(status: u16, value: &Value) -> Response {
        Response::new(status)
            .header("Content-Type", "application/json; charset=utf-8")
            .body(value.to_string().into_bytes())
    }

    /// Sets the header `name` (replacing an earlier value).
    fn header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers
            .retain(|(key, _)| !key.eq_ignore_ascii_case(name));
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    fn body(mut self, body: Vec<u8>) -> Response {
        self.body = body;
        self
    }

    /// Sends the response; without the body for `HEAD` (`head_only`), `304` and `204`.
    fn write_to(&self, out: &mut impl Write, head_only: bool, keep_alive: bool) -> io::Result<()> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        let _ = write!(head, "Content-Length: {}\r\n", self.body.len());
        if !keep_alive {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        let body = match self.status {
            _ if head_only => &[][..],
            204 | 304 => &[][..],
            _ if self.truncate => &self.body[..self.body.len() / 2],
            _ => &self.body[..],
        };
        out.write_all(body)?;
        out.flush()
    }
}

/// The reason phrase of the statuses this server sends.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        412 => "Precondition Failed",
        416 => "Range Not Satisfiable",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// A listening socket: a thread accepting connections and a thread serving each of them.
struct Listener {
    address: SocketAddr,
    stopping: Arc<AtomicBool>,
    /// The open connections, to close when stopping.
    connections: Arc<Mutex<HashMap<u64, TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Listener {
    /// Starts serving `origin` on `listener`.
    fn spawn(listener: TcpListener, origin: Origin, hub: Arc<Hub>) -> io::Result<Listener> {
        let address = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(HashMap::new()));
        let acceptor = {
            let (stopping, connections) = (Arc::clone(&stopping), Arc::clone(&connections));
            thread::Builder::new()
                .name(format!("hub server {address}"))
                .spawn(move || accept(&listener, origin, &hub, &stopping, &connections))?
        };
        Ok(Listener {
            address,
            stopping,
            connections,
            acceptor: Some(acceptor),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the acceptor up, blocked in `accept`.
        let _ = TcpStream::connect(self.address);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for connection in lock(&self.connections).values() {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }
}

/// Accepts connections until `stopping`, serving each on its own thread.
fn accept(
    listener: &TcpListener,
    origin: Origin,
    hub: &Arc<Hub>,
    stopping: &AtomicBool,
    connections: &Arc<Mutex<HashMap<u64, TcpStream>>>,
) {
    for (id, stream) in (0u64..).zip(listener.incoming()) {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        lock(connections).insert(id, handle);
        let (hub, connections) = (Arc::clone(hub), Arc::clone(connections));
        thread::spawn(move || {
            // A failing connection only concerns its client.
            let _ = serve(stream, origin, &hub);
            lock(&connections).remove(&id);
        });
    }
}

/// Answers the requests of one connection until the client closes it (or a fault does).
fn serve(stream: TcpStream, origin: Origin, hub: &Hub) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    while let Some(request) = Request::read(&mut reader)? {
        let response = hub.handle(origin, &request);
        response.write_to(&mut writer, request.method == "HEAD", request.keep_alive)?;
        if response.truncate {
            return writer.shutdown(Shutdown::Both);
        }
        if !request.keep_alive {
            break;
        }
    }
    Ok(())
}
