//! Downloading and unpacking dataset archives: the backend of `zoo data fetch imagenette`.
//!
//! An [`Archive`] names a URL, its pinned SHA-256 and size, and the folder it unpacks to.
//! [`fetch_archive`] streams it to `<dest>/<file>.part` (resuming an interrupted download
//! with an HTTP `Range` request), verifies the checksum before giving the file its final
//! name, and unpacks it into a temporary folder inside `dest` that is renamed into place only
//! once complete, with a marker file recording the verified checksum. A later call that finds
//! the marker does nothing.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::DataError;

/// Where fast.ai publishes Imagenette (the host of fastai's `URLs.IMAGENETTE*`).
pub const DEFAULT_BASE_URL: &str = "https://s3.amazonaws.com/fast-ai-imageclas";

/// Name of the marker file written into an unpacked archive's folder; it holds the archive's
/// SHA-256.
pub const MARKER: &str = ".zoo-fetched";

/// Bytes read from the network (and hashed) per step.
const CHUNK: usize = 1 << 16;

/// Download attempts within one call while each attempt makes progress.
const ATTEMPTS: usize = 5;

/// One of the three published Imagenette archives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImagenetteSize {
    /// Shorter side 160 pixels (`imagenette2-160.tgz`, 94 MiB).
    Px160,
    /// Shorter side 320 pixels (`imagenette2-320.tgz`, 326 MiB).
    Px320,
    /// Original ImageNet resolution (`imagenette2.tgz`, 1.45 GiB).
    Full,
}

impl ImagenetteSize {
    /// The folder the archive unpacks to (also the archive's file stem).
    pub fn folder(self) -> &'static str {
        match self {
            ImagenetteSize::Px160 => "imagenette2-160",
            ImagenetteSize::Px320 => "imagenette2-320",
            ImagenetteSize::Full => "imagenette2",
        }
    }

    /// The archive with its pinned size and SHA-256, served from `base_url` (default
    /// [`DEFAULT_BASE_URL`]).
    ///
    /// The checksums are those of the archives re-published in February 2021, as recorded
    /// by TensorFlow Datasets (`tensorflow_datasets/datasets/imagenette/checksums.tsv`); the
    /// sizes agree with fastai's `download_checks.py`.
    pub fn archive(self, base_url: Option<&str>) -> Archive {
        let (size, sha256) = match self {
            ImagenetteSize::Px160 => (
                99_003_388,
                "64d0c4859f35a461889e0147755a999a48b49bf38a7e0f9bd27003f10db02fe5",
            ),
            ImagenetteSize::Px320 => (
                341_663_724,
                "569b4497c98db6dd29f335d1f109cf315fe127053cedf69010d047f0188e158c",
            ),
            ImagenetteSize::Full => (
                1_557_161_267,
                "6cbfac238434d89fe99e651496f0812ebc7a10fa62bd42d6874042bf01de4efd",
            ),
        };
        let base = base_url.unwrap_or(DEFAULT_BASE_URL).trim_end_matches('/');
        let file_name = format!("{}.tgz", self.folder());
        Archive {
            url: format!("{base}/{file_name}"),
            file_name,
            sha256: sha256.to_string(),
            size: Some(size),
            folder: self.folder().to_string(),
        }
    }
}

impl FromStr for ImagenetteSize {
    type Err = DataError;

    /// Accepts `160`, `320` and `full` (also `160px`, `320px`).
    fn from_str(s: &str) -> Result<Self, DataError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "160" | "160px" => Ok(ImagenetteSize::Px160),
            "320" | "320px" => Ok(ImagenetteSize::Px320),
            "full" => Ok(ImagenetteSize::Full),
            other => Err(DataError::Invalid(format!(
                "unknown Imagenette size `{other}`: expected 160, 320 or full"
            ))),
        }
    }
}

impl fmt::Display for ImagenetteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImagenetteSize::Px160 => "160",
            ImagenetteSize::Px320 => "320",
            ImagenetteSize::Full => "full",
        })
    }
}

/// A `.tar.gz` archive to download, verify and unpack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Archive {
    /// Where to download it from (`http://` or `https://`).
    pub url: String,
    /// The archive's file name inside the destination folder.
    pub file_name: String,
    /// Expected SHA-256 of the archive, 64 hexadecimal digits.
    pub sha256: String,
    /// Expected size in bytes, when known (checked before and after downloading).
    pub size: Option<u64>,
    /// The top-level folder the archive holds; it becomes `<dest>/<folder>`.
    pub folder: String,
}

impl Archive {
    /// The archive as a file to download.
    pub fn remote(&self) -> RemoteFile {
        RemoteFile {
            url: self.url.clone(),
            file_name: self.file_name.clone(),
            sha256: self.sha256.clone(),
            size: self.size,
        }
    }
}

/// A file to download and verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    /// Where to download it from (`http://` or `https://`).
    pub url: String,
    /// The file's name inside the destination folder.
    pub file_name: String,
    /// Expected SHA-256, 64 hexadecimal digits.
    pub sha256: String,
    /// Expected size in bytes, when known (checked before and after downloading).
    pub size: Option<u64>,
}

/// A byte progress bar for a download on standard error (indicatif draws it only on a
/// terminal), and the `progress` callback that moves it, for [`fetch_file`] and
/// [`fetch_archive`].
pub fn download_bar(prefix: &str) -> (indicatif::ProgressBar, impl FnMut(u64, Option<u64>)) {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:25}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    let moved = bar.clone();
    let progress = move |done, total: Option<u64>| {
        if let Some(total) = total {
            moved.set_length(total);
        }
        moved.set_position(done);
    };
    (bar, progress)
}

/// Downloads `file` into `dest_dir` unless a copy matching its checksum is already there,
/// returning `<dest_dir>/<file_name>`. A copy that does not match is deleted and downloaded
/// again. The download goes to `<file_name>.part`, resumes an interrupted one with a `Range`
/// request, and is renamed to its final name only after its size and SHA-256 match.
pub fn fetch_file(
    file: &RemoteFile,
    dest_dir: &Path,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<PathBuf, DataError> {
    let expected = parse_sha256(&file.sha256)?;
    check_name(&file.file_name, "file name")?;
    fs::create_dir_all(dest_dir).map_err(|e| file_error(dest_dir, "cannot create folder", e))?;
    let path = dest_dir.join(&file.file_name);
    let verified = path.is_file() && {
        let got = hash_file(&path)?;
        if got != expected {
            fs::remove_file(&path).map_err(|e| {
                file_error(
                    &path,
                    "does not match its checksum and cannot be removed",
                    e,
                )
            })?;
        }
        got == expected
    };
    if !verified {
        download(file, &expected, dest_dir, &path, progress)?;
    }
    Ok(path)
}

/// Downloads, verifies and unpacks Imagenette of the given `size` into `dest_dir`, returning
/// the unpacked root (`<dest_dir>/imagenette2-160` and so on, holding `train/` and `val/`).
/// `base_url` replaces [`DEFAULT_BASE_URL`] (a mirror); `progress` is called with the bytes
/// downloaded so far and the total, when known. See [`fetch_archive`].
pub fn fetch_imagenette(
    size: ImagenetteSize,
    dest_dir: &Path,
    base_url: Option<&str>,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<PathBuf, DataError> {
    fetch_archive(&size.archive(base_url), dest_dir, progress)
}

/// Downloads, verifies and unpacks `archive` into `dest_dir`, returning
/// `<dest_dir>/<archive.folder>`.
///
/// * If that folder holds the marker written by an earlier call for the same checksum,
///   nothing else happens (no network access).
/// * An existing `<dest_dir>/<file_name>` that matches the checksum is not downloaded again
///   (one that does not is deleted and downloaded again).
/// * Otherwise the archive is streamed to `<file_name>.part`; a part file left by an
///   interrupted call is resumed with a `Range` request (a server that ignores it sends the
///   whole file, which then replaces the part file). A dropped connection is retried at once
///   as long as the previous attempt received data.
/// * The size and SHA-256 are checked before the part file is renamed to `<file_name>`; on a
///   mismatch the part file is deleted and the error gives the expected and actual values.
/// * The archive is unpacked into a temporary folder inside `dest_dir`, the marker is added,
///   and the folder is renamed into place, so an interrupted unpack never leaves a folder
///   that looks complete. The archive itself is kept.
///
/// `progress(done, total)` reports the download only (not the hashing of a resumed part
/// file, nor the unpacking). Two processes fetching into the same folder at once are not
/// supported.
pub fn fetch_archive(
    archive: &Archive,
    dest_dir: &Path,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<PathBuf, DataError> {
    let expected = parse_sha256(&archive.sha256)?;
    check_name(&archive.folder, "folder")?;

    let root = dest_dir.join(&archive.folder);
    let marker = root.join(MARKER);
    if root.exists() {
        return match fs::read_to_string(&marker) {
            Ok(recorded) if recorded.trim().eq_ignore_ascii_case(&expected) => Ok(root),
            Ok(recorded) => Err(DataError::File {
                path: root,
                message: format!(
                    "was unpacked from a different archive (SHA-256 {}, expected {expected}); \
                     remove the folder to fetch again",
                    recorded.trim()
                ),
            }),
            Err(_) => Err(DataError::File {
                path: root,
                message: format!(
                    "exists but was not unpacked by `zoo data fetch` (no `{MARKER}` marker); \
                     use it as it is, or remove it to fetch again"
                ),
            }),
        };
    }

    let archive_path = fetch_file(&archive.remote(), dest_dir, progress)?;
    unpack(&archive_path, dest_dir, &archive.folder, &expected)?;
    Ok(root)
}

/// Downloads `remote` to `<file_name>.part`, verifies it and renames it to `path`.
fn download(
    remote: &RemoteFile,
    expected: &str,
    dest_dir: &Path,
    path: &Path,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<(), DataError> {
    let part = dest_dir.join(format!("{}.part", remote.file_name));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .user_agent(concat!("zoo/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let mut attempt = 0;
    loop {
        attempt += 1;
        match download_once(&agent, remote, &part, progress) {
            Ok(hash) => {
                let length = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
                if let Some(size) = remote.size.filter(|&size| size != length) {
                    discard(&part);
                    return Err(DataError::File {
                        path: part,
                        message: format!(
                            "downloaded {length} bytes from {}, expected {size}; the download was deleted",
                            remote.url
                        ),
                    });
                }
                if hash != expected {
                    discard(&part);
                    return Err(DataError::File {
                        path: part,
                        message: format!(
                            "SHA-256 mismatch for {}: expected {expected}, got {hash}; the download was deleted",
                            remote.url
                        ),
                    });
                }
                return fs::rename(&part, path)
                    .map_err(|e| file_error(path, "cannot rename the verified download", e));
            }
            Err(Failure::Retry(_)) if attempt < ATTEMPTS => continue,
            Err(Failure::Retry(e) | Failure::Fatal(e)) => {
                // Nothing worth resuming.
                if fs::metadata(&part).is_ok_and(|m| m.len() == 0) {
                    discard(&part);
                }
                return Err(e);
            }
        }
    }
}

/// Why one download attempt stopped: worth another attempt (data arrived before the
/// connection failed), or not.
enum Failure {
    Retry(DataError),
    Fatal(DataError),
}

/// One HTTP request, appending to the part file from its current length. Returns the SHA-256
/// of the whole part file.
fn download_once(
    agent: &ureq::Agent,
    remote: &RemoteFile,
    part: &Path,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<String, Failure> {
    let fatal = |message: &str, e: io::Error| Failure::Fatal(file_error(part, message, e));
    let mut file = open_part(part).map_err(|e| fatal("cannot open the download file", e))?;
    let have = file
        .metadata()
        .map_err(|e| fatal("cannot read the download file", e))?
        .len();
    // What earlier attempts left, unless it is longer than the file it is part of.
    let have = if remote.size.is_some_and(|size| have > size) {
        0
    } else {
        have
    };
    if remote.size == Some(have) {
        // A previous attempt received everything but stopped before verifying.
        progress(have, remote.size);
        return hash_reader(&mut file).map_err(|e| fatal("cannot read the download file", e));
    }
    // Closed before asking: an answer that shows the part file unusable deletes it.
    drop(file);
    let answer = request_from(agent, remote, part, have)?;
    append_body(answer, remote, part, progress)
}

/// The part file, created empty if missing, open for reading and appending.
fn open_part(part: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(part)
}

/// A server's answer to a download request: its body, the offset of the body's first byte in
/// the file, and the whole file's length when known.
struct Answer {
    body: ureq::Body,
    start: u64,
    total: Option<u64>,
}

/// Asks for `remote` from byte `have` on (all of it for 0) and checks the answer against the
/// request and the expected size. A part file the answer shows to be unusable is deleted.
fn request_from(
    agent: &ureq::Agent,
    remote: &RemoteFile,
    part: &Path,
    have: u64,
) -> Result<Answer, Failure> {
    let fatal = |message: String| {
        Failure::Fatal(DataError::File {
            path: part.to_path_buf(),
            message,
        })
    };
    let url = &remote.url;
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    let response = request
        .call()
        .map_err(|e| fatal(format!("downloading {url}: {e}")))?;
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let length: Option<u64> = header("content-length").and_then(|v| v.trim().parse().ok());
    let (start, total) = match status {
        200 => (0, length),
        206 => {
            let range = header("content-range").unwrap_or_default();
            let (first, total) = parse_content_range(&range).ok_or_else(|| {
                fatal(format!(
                    "downloading {url}: the server answered a range request with an unusable \
                     Content-Range `{range}`"
                ))
            })?;
            if first != have {
                return Err(fatal(format!(
                    "downloading {url}: asked for bytes from {have}, the server sent from {first}"
                )));
            }
            (have, total.or(length.map(|l| l + have)))
        }
        416 => {
            // The part file does not fit the file on the server: start over.
            discard(part);
            return Err(Failure::Retry(DataError::File {
                path: part.to_path_buf(),
                message: format!("downloading {url}: the server refused to resume at byte {have}"),
            }));
        }
        _ => return Err(fatal(format!("downloading {url}: HTTP status {status}"))),
    };
    if let (Some(size), Some(total)) = (remote.size, total) {
        if size != total {
            // Whatever the part file holds belongs to another file.
            discard(part);
            return Err(fatal(format!(
                "the server reports {total} bytes for {url}, expected {size}: the file has \
                 changed upstream or the URL is wrong"
            )));
        }
    }
    Ok(Answer {
        body: response.into_body(),
        start,
        total: total.or(remote.size),
    })
}

/// Keeps the part file's first `answer.start` bytes, appends the answer's body and returns the
/// SHA-256 of the whole file. A body cut short after some bytes is worth another attempt.
fn append_body(
    answer: Answer,
    remote: &RemoteFile,
    part: &Path,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<String, Failure> {
    let fatal = |message: &str, e: io::Error| Failure::Fatal(file_error(part, message, e));
    let Answer { body, start, total } = answer;
    let mut file = open_part(part).map_err(|e| fatal("cannot open the download file", e))?;
    // Hash what is already there, then append the rest while hashing it.
    let mut hasher = Sha256::new();
    if start > 0 {
        hash_into(&mut (&mut file).take(start), &mut hasher)
            .map_err(|e| fatal("cannot read the download file", e))?;
    }
    file.set_len(start)
        .and_then(|_| file.seek(SeekFrom::Start(start)))
        .map_err(|e| fatal("cannot write the download file", e))?;

    let mut body = body.into_reader();
    let mut buffer = vec![0u8; CHUNK];
    let mut done = start;
    progress(done, total);
    loop {
        let n = match body.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let error = DataError::File {
                    path: part.to_path_buf(),
                    message: format!(
                        "download of {} interrupted after {done} bytes ({e}); run again to resume",
                        remote.url
                    ),
                };
                return Err(if done > start {
                    Failure::Retry(error)
                } else {
                    Failure::Fatal(error)
                });
            }
        };
        file.write_all(&buffer[..n])
            .map_err(|e| fatal("cannot write the download file", e))?;
        hasher.update(&buffer[..n]);
        done += n as u64;
        progress(done, total);
    }
    file.sync_all()
        .map_err(|e| fatal("cannot write the download file", e))?;
    Ok(hex(&hasher.finalize()))
}

/// Unpacks the verified archive into a temporary folder inside `dest_dir`, adds the marker
/// and renames `<tmp>/<folder>` to `<dest_dir>/<folder>`.
fn unpack(
    archive_path: &Path,
    dest_dir: &Path,
    folder: &str,
    sha256: &str,
) -> Result<(), DataError> {
    let prefix = format!(".{folder}.unpacking-");
    // Left over by an interrupted unpack.
    if let Ok(entries) = fs::read_dir(dest_dir) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    let tmp = dest_dir.join(format!("{prefix}{}", std::process::id()));
    fs::create_dir_all(&tmp).map_err(|e| file_error(&tmp, "cannot create folder", e))?;
    let result = (|| {
        let file =
            File::open(archive_path).map_err(|e| file_error(archive_path, "cannot open", e))?;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(file)));
        tar.set_preserve_permissions(false);
        tar.unpack(&tmp)
            .map_err(|e| file_error(archive_path, "cannot unpack", e))?;
        let unpacked = tmp.join(folder);
        if !unpacked.is_dir() {
            return Err(DataError::File {
                path: archive_path.to_path_buf(),
                message: format!("the archive has no top-level folder `{folder}`"),
            });
        }
        let marker = unpacked.join(MARKER);
        fs::write(&marker, format!("{sha256}\n"))
            .map_err(|e| file_error(&marker, "cannot write", e))?;
        let root = dest_dir.join(folder);
        fs::rename(&unpacked, &root)
            .map_err(|e| file_error(&root, "cannot move the unpacked folder into place", e))
    })();
    let _ = fs::remove_dir_all(&tmp);
    result
}

/// Parses `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`).
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (first, _last) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((first.trim().parse().ok()?, total))
}

/// Validates a 64-digit hexadecimal SHA-256 and returns it in lower case.
fn parse_sha256(value: &str) -> Result<String, DataError> {
    let value = value.trim().to_ascii_lowercase();
    if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DataError::Invalid(format!(
            "`{value}` is not a SHA-256 (64 hexadecimal digits)"
        )));
    }
    Ok(value)
}

/// Rejects names that would leave the destination folder.
fn check_name(name: &str, what: &str) -> Result<(), DataError> {
    let mut components = Path::new(name).components();
    match (components.next(), components.next()) {
        (Some(std::path::Component::Normal(_)), None) => Ok(()),
        _ => Err(DataError::Invalid(format!(
            "the download's {what} `{name}` must be a single plain path component"
        ))),
    }
}

fn hash_file(path: &Path) -> Result<String, DataError> {
    let mut file = File::open(path).map_err(|e| file_error(path, "cannot open", e))?;
    hash_reader(&mut file).map_err(|e| file_error(path, "cannot read", e))
}

fn hash_reader(reader: &mut impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    hash_into(reader, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

fn hash_into(reader: &mut impl Read, hasher: &mut Sha256) -> io::Result<()> {
    let mut buffer = vec![0u8; CHUNK];
    loop {
        match reader.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(n) => hasher.update(&buffer[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes a file that must not be used, ignoring failure (it is already being reported).
fn discard(path: &Path) {
    let _ = fs::remove_file(path);
}

fn file_error(path: &Path, what: &str, e: io::Error) -> DataError {
    DataError::File {
        path: path.to_path_buf(),
        message: format!("{what}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 10-99/100"),
            Some((10, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 0-9/*"), Some((0, None)));
        assert_eq!(parse_content_range("items 0-9/10"), None);
    }

    #[test]
    fn sizes_parse_and_name_archives() {
        assert_eq!(
            "160".parse::<ImagenetteSize>().unwrap(),
            ImagenetteSize::Px160
        );
        assert_eq!(
            "320px".parse::<ImagenetteSize>().unwrap(),
            ImagenetteSize::Px320
        );
        assert_eq!(
            "FULL".parse::<ImagenetteSize>().unwrap(),
            ImagenetteSize::Full
        );
        assert!("224".parse::<ImagenetteSize>().is_err());
        let archive = ImagenetteSize::Px320.archive(Some("http://mirror.test/data/"));
        assert_eq!(archive.url, "http://mirror.test/data/imagenette2-320.tgz");
        assert_eq!(archive.folder, "imagenette2-320");
        for size in [
            ImagenetteSize::Px160,
            ImagenetteSize::Px320,
            ImagenetteSize::Full,
        ] {
            assert!(parse_sha256(&size.archive(None).sha256).is_ok());
        }
    }

    #[test]
    fn names_stay_inside_the_destination() {
        assert!(check_name("a.tgz", "file name").is_ok());
        assert!(check_name("../a.tgz", "file name").is_err());
        assert!(check_name("a/b", "folder").is_err());
        assert!(check_name("", "folder").is_err());
    }
}
