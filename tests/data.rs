//! Image folder datasets (`zoo::data::folder`) on a small Imagenette-style folder generated
//! here, and archive downloads (`zoo::data::fetch`) from a loopback HTTP server; no network.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage};
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use zoo::data::fetch::{fetch_archive, fetch_imagenette, Archive, ImagenetteSize, MARKER};
use zoo::data::folder::{normalise, resize_side, FolderOptions, ImageFolder};
use zoo::data::{shuffled_order, DataError, Dataset, Loader, LoaderOptions, Rng, Split};

const SIZE: usize = 16;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("zoo-data-test-")
        .tempdir()
        .expect("temporary folder")
}

fn save_rgb(path: &Path, width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_fn(width, height, |x, y| Rgb(pixel(x, y)))
        .save(path)
        .unwrap();
}

fn touch(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A deterministic colourful pattern.
fn pattern(x: u32, y: u32) -> [u8; 3] {
    [
        (x * 37 + y * 11) as u8,
        (x * 5 + y * 71 + 13) as u8,
        (x ^ y).wrapping_mul(29) as u8,
    ]
}

/// `root/train/{n01,n02,n03}` and `root/val/{n01,n02,n03}`: JPEGs and PNGs of various shapes,
/// a grayscale PNG, a 16-bit PNG, a corrupt JPEG, a `.txt` in a class folder and a loose file.
fn imagenette_like(root: &Path) {
    let train = root.join("train");
    save_rgb(&train.join("n01/a.JPEG"), 24, 32, pattern);
    save_rgb(&train.join("n01/b.jpg"), 40, 21, |x, y| pattern(y, x));
    GrayImage::from_fn(20, 20, |x, y| Luma([(x * 12 + y) as u8]))
        .save(train.join("n01/gray.png"))
        .unwrap();
    save_rgb(&train.join("n02/a.png"), 19, 23, pattern);
    save_rgb(&train.join("n02/b.JPEG"), 33, 33, |x, y| pattern(x + 3, y));
    touch(
        &train.join("n02/corrupt.JPEG"),
        b"\xff\xd8\xff\xe0 definitely not a JPEG",
    );
    touch(&train.join("n02/notes.txt"), b"not an image");
    std::fs::create_dir_all(train.join("n03")).unwrap();
    ImageBuffer::<Rgb<u16>, Vec<u16>>::from_fn(17, 25, |x, y| {
        Rgb([(x * 3000) as u16, (y * 2000) as u16, 40_000])
    })
    .save(train.join("n03/deep.png"))
    .unwrap();
    touch(&train.join("README"), b"loose file");
    let val = root.join("val");
    save_rgb(&val.join("n01/v.png"), 30, 18, pattern);
    save_rgb(&val.join("n02/v.JPEG"), 18, 30, pattern);
    save_rgb(&val.join("n03/v.png"), 40, 30, |_, _| [10, 200, 30]);
}

fn open(root: &Path, split: Split) -> ImageFolder {
    ImageFolder::open(root, split, SIZE, FolderOptions::default()).unwrap()
}

fn load(
    dataset: &ImageFolder,
    index: usize,
    seed: Option<u64>,
) -> Result<(u32, Vec<f32>), DataError> {
    let mut out = vec![0f32; 3 * SIZE * SIZE];
    let mut rng = seed.map(Rng::seed_from_u64);
    let label = dataset.load(index, rng.as_mut(), &mut out)?;
    Ok((label, out))
}

fn index_of(dataset: &ImageFolder, name: &str) -> usize {
    (0..dataset.len())
        .find(|&i| dataset.sample(i).unwrap().0.ends_with(name))
        .unwrap_or_else(|| panic!("no sample {name}"))
}

/// Undoes the normalisation of channel `c`: the pixel value in 0..=255.
fn pixel(c: usize, value: f32) -> f32 {
    let mean = [0.485f32, 0.456, 0.406][c];
    let std = [0.229f32, 0.224, 0.225][c];
    (value * std + mean) * 255.0
}

#[test]
fn splits_share_the_training_classes() {
    let dir = tempdir();
    imagenette_like(dir.path());
    let train = open(dir.path(), Split::Train);
    let val = open(dir.path(), Split::Validation);
    assert_eq!(train.classes(), ["n01", "n02", "n03"]);
    assert_eq!(val.classes(), train.classes());
    assert_eq!(train.shape(), [3, SIZE, SIZE]);
    assert_eq!(train.len(), 7);
    assert_eq!(val.len(), 3);
    let train_dir = dir.path().join("train");
    assert_eq!(
        train.ignored_files(),
        [
            train_dir.join("README"),
            train_dir.join("n02").join("notes.txt")
        ]
    );
    assert!(val.ignored_files().is_empty());
    for (dataset, expected) in [
        (&train, [("gray.png", 0), ("b.JPEG", 1), ("deep.png", 2)]),
        (
            &val,
            [("n01/v.png", 0), ("n02/v.JPEG", 1), ("n03/v.png", 2)],
        ),
    ] {
        for (name, label) in expected {
            let index = index_of(dataset, &name.replace('/', std::path::MAIN_SEPARATOR_STR));
            assert_eq!(dataset.sample(index).unwrap().1, label);
            assert_eq!(load(dataset, index, None).unwrap().0, label);
            assert_eq!(load(dataset, index, Some(3)).unwrap().0, label);
        }
    }
}

#[test]
fn samples_are_normalised_rgb() {
    let dir = tempdir();
    imagenette_like(dir.path());
    let train = open(dir.path(), Split::Train);
    let (low, high) = (
        normalise(0, 0).min(normalise(1, 0)).min(normalise(2, 0)),
        normalise(0, 255)
            .max(normalise(1, 255))
            .max(normalise(2, 255)),
    );
    for index in 0..train.len() {
        if train.sample(index).unwrap().0.ends_with("corrupt.JPEG") {
            continue;
        }
        for seed in [None, Some(1), Some(2)] {
            let (_, out) = load(&train, index, seed).unwrap();
            assert!(out
                .iter()
                .all(|v| v.is_finite() && *v >= low - 1e-5 && *v <= high + 1e-5));
        }
    }
    // Grayscale becomes R = G = B.
    let (_, out) = load(&train, index_of(&train, "gray.png"), Some(9)).unwrap();
    let plane = SIZE * SIZE;
    for i in 0..plane {
        let (r, g, b) = (
            pixel(0, out[i]),
            pixel(1, out[plane + i]),
            pixel(2, out[2 * plane + i]),
        );
        assert!((r - g).abs() < 1e-3 && (g - b).abs() < 1e-3, "{r} {g} {b}");
    }
    // 16-bit channels are scaled to 8 bits: blue is 40000/65535 of full scale everywhere.
    let (_, out) = load(&train, index_of(&train, "deep.png"), None).unwrap();
    let blue = (40_000.0f32 / 65_535.0 * 255.0).round();
    assert!(out[2 * plane..]
        .iter()
        .all(|&v| (pixel(2, v) - blue).abs() < 1e-3));
}

#[test]
fn augmentation_is_deterministic_per_seed() {
    let dir = tempdir();
    imagenette_like(dir.path());
    let train = open(dir.path(), Split::Train);
    let index = index_of(&train, "b.jpg");
    let first = load(&train, index, Some(42)).unwrap().1;
    assert_eq!(first, load(&train, index, Some(42)).unwrap().1);
    assert!((0..8).any(|seed| load(&train, index, Some(seed)).unwrap().1 != first));
    // Validation is deterministic too, and differs from the augmented views.
    let val = load(&train, index, None).unwrap().1;
    assert_eq!(val, load(&train, index, None).unwrap().1);
}

#[test]
fn training_flips_half_of_the_time() {
    let dir = tempdir();
    // Red on the left, blue on the right: a crop keeps red left of blue unless flipped.
    let path = dir.path().join("train/only/split.png");
    save_rgb(&path, 64, 64, |x, _| {
        if x < 32 {
            [255, 0, 0]
        } else {
            [0, 0, 255]
        }
    });
    let train = open(dir.path(), Split::Train);
    let plane = SIZE * SIZE;
    let (mut kept, mut flipped) = (0, 0);
    for seed in 0..200 {
        let (_, out) = load(&train, 0, Some(seed)).unwrap();
        let (left, right) = (pixel(0, out[0]), pixel(0, out[SIZE - 1]));
        let (left_blue, right_blue) = (
            pixel(2, out[2 * plane]),
            pixel(2, out[2 * plane + SIZE - 1]),
        );
        if left > 200.0 && right_blue > 200.0 {
            kept += 1;
        } else if right > 200.0 && left_blue > 200.0 {
            flipped += 1;
        }
    }
    assert!(kept > 20 && flipped > 20, "kept {kept}, flipped {flipped}");
}

#[test]
fn validation_resizes_and_center_crops_exactly() {
    let dir = tempdir();
    imagenette_like(dir.path());
    let val = open(dir.path(), Split::Validation);
    // A constant colour stays exactly that colour.
    let constant = index_of(&val, &format!("n03{}v.png", std::path::MAIN_SEPARATOR));
    let (label, out) = load(&val, constant, None).unwrap();
    assert_eq!(label, 2);
    let plane = SIZE * SIZE;
    for (c, value) in [10u8, 200, 30].into_iter().enumerate() {
        assert!(out[c * plane..(c + 1) * plane]
            .iter()
            .all(|&v| v == normalise(c, value)));
    }
    // 30x18: the shorter side already is round(16 / 0.875) = 18, so no resampling; the crop
    // starts at x = 7, y = 1.
    assert_eq!(resize_side(SIZE), 18);
    let wide = index_of(&val, &format!("n01{}v.png", std::path::MAIN_SEPARATOR));
    let (_, out) = load(&val, wide, None).unwrap();
    for y in 0..SIZE {
        for x in 0..SIZE {
            let expected = pattern(x as u32 + 7, y as u32 + 1);
            for c in 0..3 {
                assert_eq!(
                    out[c * plane + y * SIZE + x],
                    normalise(c, expected[c]),
                    "({x},{y}) channel {c}"
                );
            }
        }
    }
}

#[test]
fn the_cache_keeps_validation_pixels_identical() {
    let dir = tempdir();
    imagenette_like(dir.path());
    // Big images, so that the cache has something to shrink.
    save_rgb(&dir.path().join("val/n02/big.png"), 90, 61, pattern);
    let plain = open(dir.path(), Split::Validation);
    let cached = ImageFolder::open(
        dir.path(),
        Split::Validation,
        SIZE,
        FolderOptions {
            cache: true,
            cache_side: None,
        },
    )
    .unwrap();
    assert_eq!(cached.cached_bytes(), 0);
    for index in 0..plain.len() {
        let expected = load(&plain, index, None).unwrap();
        assert_eq!(load(&cached, index, None).unwrap(), expected);
        assert_eq!(
            load(&cached, index, None).unwrap(),
            expected,
            "second read, from the cache"
        );
        // Training views from the cache are deterministic as well.
        assert_eq!(
            load(&cached, index, Some(5)).unwrap(),
            load(&cached, index, Some(5)).unwrap()
        );
    }
    // 40x30 is kept at 24x18 and 90x61 at 26x18 (shorter side 18); the others as they are.
    let stored: u64 = [(30, 18), (18, 30), (24, 18), (26, 18)]
        .iter()
        .map(|(w, h)| w * h * 3)
        .sum();
    assert_eq!(cached.cached_bytes(), stored);
}

#[test]
fn the_loader_skips_and_reports_undecodable_files() {
    let dir = tempdir();
    imagenette_like(dir.path());
    let cached = ImageFolder::open(
        dir.path(),
        Split::Train,
        SIZE,
        FolderOptions {
            cache: true,
            cache_side: None,
        },
    )
    .unwrap();
    let direct = load(&cached, index_of(&cached, "corrupt.JPEG"), None).unwrap_err();
    let DataError::Sample { path, message } = &direct else {
        panic!("expected a sample error, got {direct}");
    };
    assert!(path.ends_with("corrupt.JPEG"), "{}", path.display());
    assert!(!message.is_empty());
    let dataset: Arc<dyn Dataset> = Arc::new(cached);
    for epoch in 0..2 {
        let options = LoaderOptions {
            batch_size: 3,
            drop_last: false,
            augment: Some((11, epoch)),
            workers: 2,
            prefetch: 2,
        };
        let order = shuffled_order(dataset.len(), 11, epoch);
        let mut labels = Vec::new();
        let mut skipped = Vec::new();
        for batch in Loader::new(dataset.clone(), order, 0, &options) {
            let batch = batch.unwrap();
            assert_eq!(batch.images.len(), batch.labels.len() * 3 * SIZE * SIZE);
            labels.extend(batch.labels);
            skipped.extend(batch.skipped);
        }
        labels.sort();
        assert_eq!(labels, [0, 0, 0, 1, 1, 2]);
        assert_eq!(skipped.len(), 1);
        assert!(
            skipped[0].to_string().contains("corrupt.JPEG"),
            "{}",
            skipped[0]
        );
    }
}

fn open_error(root: &Path, split: Split) -> String {
    match ImageFolder::open(root, split, SIZE, FolderOptions::default()) {
        Ok(_) => panic!("opening {} should fail", root.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn folder_errors_name_the_path_and_the_problem() {
    let dir = tempdir();
    let root = dir.path();
    let missing = open_error(&root.join("nowhere"), Split::Train);
    assert!(
        missing.contains("nowhere") && missing.contains("no such folder"),
        "{missing}"
    );
    let no_train = open_error(root, Split::Train);
    assert!(
        no_train.contains("train") && no_train.contains("missing"),
        "{no_train}"
    );

    std::fs::create_dir_all(root.join("train")).unwrap();
    let no_classes = open_error(root, Split::Train);
    assert!(no_classes.contains("no class folders"), "{no_classes}");

    save_rgb(&root.join("train/cat/1.png"), 8, 8, pattern);
    std::fs::create_dir_all(root.join("train/dog")).unwrap();
    touch(&root.join("train/dog/readme.md"), b"no images here");
    let empty = open_error(root, Split::Train);
    assert!(
        empty.contains("dog") && empty.contains("no images"),
        "{empty}"
    );

    save_rgb(&root.join("train/dog/1.jpg"), 8, 8, pattern);
    assert_eq!(open(root, Split::Train).len(), 2);
    let no_val = open_error(root, Split::Validation);
    assert!(
        no_val.contains("val") && no_val.contains("missing"),
        "{no_val}"
    );

    save_rgb(&root.join("val/cat/1.png"), 8, 8, pattern);
    save_rgb(&root.join("val/bird/1.png"), 8, 8, pattern);
    let unknown = open_error(root, Split::Validation);
    assert!(
        unknown.contains("bird") && unknown.contains("not among"),
        "{unknown}"
    );
    std::fs::remove_dir_all(root.join("val/bird")).unwrap();
    // A validation split may leave classes out; labels still follow `train/`.
    std::fs::create_dir_all(root.join("val/dog")).unwrap();
    let empty_val = open_error(root, Split::Validation);
    assert!(
        empty_val.contains("dog") && empty_val.contains("no images"),
        "{empty_val}"
    );
    std::fs::remove_dir_all(root.join("val/dog")).unwrap();
    let val = open(root, Split::Validation);
    assert_eq!(val.classes(), ["cat", "dog"]);
    assert_eq!(val.len(), 1);

    assert!(matches!(
        ImageFolder::open(root, Split::Train, 0, FolderOptions::default()),
        Err(DataError::Invalid(_))
    ));
    let train = open(root, Split::Train);
    assert!(matches!(
        train.load(2, None, &mut [0.0; 3 * SIZE * SIZE]),
        Err(DataError::Invalid(_))
    ));
    assert!(matches!(
        train.load(0, None, &mut [0.0; 5]),
        Err(DataError::Invalid(_))
    ));
}

// ---------------------------------------------------------------------------------------
// Downloads.

/// What the test server saw: one entry per request, its path and `Range` header.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    path: String,
    range: Option<String>,
}

struct Server {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// How the test server behaves.
#[derive(Clone, Copy, Default)]
struct Behaviour {
    /// On the first request, send only this many body bytes, then close the connection.
    drop_first_after: Option<usize>,
    /// Ignore `Range` and always send the whole file with 200.
    ignore_range: bool,
}

/// A minimal HTTP/1.1 server on 127.0.0.1 serving `body` at `/<name>` (404 elsewhere),
/// with `Range: bytes=N-` support.
fn serve(name: &str, body: Vec<u8>, behaviour: Behaviour) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (log, target) = (seen.clone(), format!("/{name}"));
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { continue };
            let drop_after = if n == 0 {
                behaviour.drop_first_after
            } else {
                None
            };
            let _ = respond(stream, &target, &body, behaviour, drop_after, &log);
        }
    });
    Server { base, seen }
}

fn respond(
    mut stream: TcpStream,
    target: &str,
    body: &[u8],
    behaviour: Behaviour,
    drop_after: Option<usize>,
    log: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_string());
            }
        }
    }
    log.lock().unwrap().push(Seen {
        path: path.clone(),
        range: range.clone(),
    });
    if path != target {
        stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    let start = range.filter(|_| !behaviour.ignore_range).and_then(|r| {
        r.strip_prefix("bytes=")?
            .strip_suffix('-')?
            .parse::<usize>()
            .ok()
    });
    let (head, part) = match start {
        Some(start) if start >= body.len() => {
            let head = format!(
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                body.len()
            );
            (head, &body[..0])
        }
        Some(start) => (
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len() - 1,
                body.len(),
                body.len() - start
            ),
            &body[start..],
        ),
        None => (
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()),
            body,
        ),
    };
    stream.write_all(head.as_bytes())?;
    let part = &part[..drop_after.unwrap_or(part.len()).min(part.len())];
    stream.write_all(part)?;
    stream.flush()?;
    stream.shutdown(Shutdown::Both)
}

/// Incompressible bytes, so the archive is big enough to be cut mid-way.
fn noise(len: usize, mut state: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A `.tar.gz` holding `mini/train/a/blob.bin` (the noise) and `mini/val/a/note.txt`.
fn archive_bytes(blob: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (path, data) in [
        ("mini/train/a/blob.bin", blob),
        ("mini/val/a/note.txt", b"hello".as_slice()),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, path, data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Fixture {
    blob: Vec<u8>,
    tgz: Vec<u8>,
}

fn fixture() -> Fixture {
    let blob = noise(300_000, 0x1234_5678_9abc_def1);
    let tgz = archive_bytes(&blob);
    Fixture { blob, tgz }
}

fn archive_for(server: &Server, tgz: &[u8]) -> Archive {
    Archive {
        url: format!("{}/mini.tgz", server.base),
        file_name: "mini.tgz".to_string(),
        sha256: sha256(tgz),
        size: Some(tgz.len() as u64),
        folder: "mini".to_string(),
    }
}

/// The progress calls of one fetch: `(done, total)`.
type Progress = Vec<(u64, Option<u64>)>;

fn fetch(archive: &Archive, dest: &Path) -> Result<(PathBuf, Progress), DataError> {
    let mut calls = Vec::new();
    let root = fetch_archive(archive, dest, &mut |done, total| calls.push((done, total)))?;
    Ok((root, calls))
}

fn assert_unpacked(root: &Path, fixture: &Fixture, archive: &Archive) {
    assert_eq!(
        std::fs::read(root.join("train/a/blob.bin")).unwrap(),
        fixture.blob
    );
    assert_eq!(
        std::fs::read(root.join("val/a/note.txt")).unwrap(),
        b"hello"
    );
    assert_eq!(
        std::fs::read_to_string(root.join(MARKER)).unwrap().trim(),
        archive.sha256
    );
    let dest = root.parent().unwrap();
    assert_eq!(std::fs::read(dest.join("mini.tgz")).unwrap(), fixture.tgz);
    let leftovers: Vec<_> = std::fs::read_dir(dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "mini" && name != "mini.tgz")
        .collect();
    assert!(leftovers.is_empty(), "left over: {leftovers:?}");
}

#[test]
fn fetch_downloads_verifies_and_unpacks_once() {
    let fixture = fixture();
    let server = serve("mini.tgz", fixture.tgz.clone(), Behaviour::default());
    let archive = archive_for(&server, &fixture.tgz);
    let dest = tempdir();
    let (root, progress) = fetch(&archive, dest.path()).unwrap();
    assert_eq!(root, dest.path().join("mini"));
    assert_unpacked(&root, &fixture, &archive);
    let total = fixture.tgz.len() as u64;
    assert_eq!(progress.first(), Some(&(0, Some(total))));
    assert_eq!(progress.last(), Some(&(total, Some(total))));
    assert!(progress.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(
        server.seen(),
        [Seen {
            path: "/mini.tgz".into(),
            range: None
        }]
    );

    // Again: nothing to do, not even with the server gone.
    let gone = Archive {
        url: "http://127.0.0.1:9/mini.tgz".into(),
        ..archive.clone()
    };
    let (again, progress) = fetch(&gone, dest.path()).unwrap();
    assert_eq!(again, root);
    assert!(progress.is_empty());
    assert_eq!(server.seen().len(), 1);

    // Without the unpacked folder (and with a stale half-unpacked one), the kept archive is
    // unpacked again, still without a download.
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::create_dir_all(dest.path().join(".mini.unpacking-99999/mini/train")).unwrap();
    fetch(&gone, dest.path()).unwrap();
    assert_unpacked(&root, &fixture, &archive);

    // A folder that this code did not unpack is left alone.
    std::fs::remove_file(root.join(MARKER)).unwrap();
    let error = fetch(&gone, dest.path()).unwrap_err().to_string();
    assert!(error.contains("marker"), "{error}");
}

#[test]
fn fetch_resumes_a_dropped_connection_with_a_range_request() {
    let fixture = fixture();
    let cut = 100_000;
    let server = serve(
        "mini.tgz",
        fixture.tgz.clone(),
        Behaviour {
            drop_first_after: Some(cut),
            ..Behaviour::default()
        },
    );
    let archive = archive_for(&server, &fixture.tgz);
    let dest = tempdir();
    let (root, progress) = fetch(&archive, dest.path()).unwrap();
    assert_unpacked(&root, &fixture, &archive);
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].range, None);
    assert_eq!(
        seen[1].range.as_deref(),
        Some(format!("bytes={cut}-").as_str())
    );
    assert!(progress.contains(&(cut as u64, Some(fixture.tgz.len() as u64))));
}

#[test]
fn fetch_resumes_a_part_file_left_by_an_earlier_run() {
    let fixture = fixture();
    let server = serve("mini.tgz", fixture.tgz.clone(), Behaviour::default());
    let archive = archive_for(&server, &fixture.tgz);
    let dest = tempdir();
    let cut = 123_457;
    std::fs::write(dest.path().join("mini.tgz.part"), &fixture.tgz[..cut]).unwrap();
    let (root, _) = fetch(&archive, dest.path()).unwrap();
    assert_unpacked(&root, &fixture, &archive);
    assert_eq!(
        server.seen(),
        [Seen {
            path: "/mini.tgz".into(),
            range: Some(format!("bytes={cut}-"))
        }]
    );

    // A part file as long as the archive needs no request at all.
    let dest = tempdir();
    std::fs::write(dest.path().join("mini.tgz.part"), &fixture.tgz).unwrap();
    let (root, _) = fetch(&archive, dest.path()).unwrap();
    assert_unpacked(&root, &fixture, &archive);
    assert_eq!(server.seen().len(), 1);
}

#[test]
fn fetch_restarts_when_the_server_ignores_the_range() {
    let fixture = fixture();
    let server = serve(
        "mini.tgz",
        fixture.tgz.clone(),
        Behaviour {
            ignore_range: true,
            ..Behaviour::default()
        },
    );
    let archive = archive_for(&server, &fixture.tgz);
    let dest = tempdir();
    // The part file holds garbage: appending to it would fail the checksum.
    std::fs::write(dest.path().join("mini.tgz.part"), vec![7u8; 5_000]).unwrap();
    let (root, _) = fetch(&archive, dest.path()).unwrap();
    assert_unpacked(&root, &fixture, &archive);
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].range.as_deref(), Some("bytes=5000-"));
}

#[test]
fn fetch_starts_over_when_the_server_refuses_the_range() {
    let fixture = fixture();
    let server = serve("mini.tgz", fixture.tgz.clone(), Behaviour::default());
    // Without a pinned size, a part file as long as the file on the server (here: garbage)
    // asks for the bytes after its end; the server answers 416, and the part file goes.
    let archive = Archive {
        size: None,
        ..archive_for(&server, &fixture.tgz)
    };
    let dest = tempdir();
    let stale = vec![7u8; fixture.tgz.len()];
    std::fs::write(dest.path().join("mini.tgz.part"), stale).unwrap();
    let (root, _) = fetch(&archive, dest.path()).unwrap();
    assert_unpacked(&root, &fixture, &archive);
    let ranges: Vec<_> = server.seen().into_iter().map(|s| s.range).collect();
    assert_eq!(
        ranges,
        [Some(format!("bytes={}-", fixture.tgz.len())), None]
    );
}

#[test]
fn fetch_rejects_a_wrong_checksum_and_keeps_nothing() {
    let fixture = fixture();
    let server = serve("mini.tgz", fixture.tgz.clone(), Behaviour::default());
    let wrong = "ab".repeat(32);
    let archive = Archive {
        sha256: wrong.clone(),
        ..archive_for(&server, &fixture.tgz)
    };
    let dest = tempdir();
    let error = fetch(&archive, dest.path()).unwrap_err().to_string();
    assert!(
        error.contains(&wrong) && error.contains(&sha256(&fixture.tgz)),
        "{error}"
    );
    let left: Vec<_> = std::fs::read_dir(dest.path()).unwrap().collect();
    assert!(left.is_empty(), "left over: {left:?}");

    // A size that does not match what the server reports fails before downloading.
    let archive = Archive {
        size: Some(12),
        ..archive_for(&server, &fixture.tgz)
    };
    let error = fetch(&archive, dest.path()).unwrap_err().to_string();
    assert!(error.contains("expected 12"), "{error}");
    assert!(!dest.path().join("mini").exists() && !dest.path().join("mini.tgz").exists());

    // A missing file is an HTTP error naming the status.
    let archive = Archive {
        url: format!("{}/other.tgz", server.base),
        ..archive_for(&server, &fixture.tgz)
    };
    let error = fetch(&archive, dest.path()).unwrap_err().to_string();
    assert!(error.contains("404"), "{error}");
}

#[test]
fn fetch_imagenette_checks_the_pinned_archive() {
    let fixture = fixture();
    let server = serve(
        "imagenette2-160.tgz",
        fixture.tgz.clone(),
        Behaviour::default(),
    );
    let dest = tempdir();
    let size: ImagenetteSize = "160".parse().unwrap();
    let error = fetch_imagenette(size, dest.path(), Some(&server.base), &mut |_, _| {})
        .unwrap_err()
        .to_string();
    // The test archive is not Imagenette: its size differs from the pinned one.
    assert!(error.contains("expected 99003388"), "{error}");
    assert_eq!(server.seen()[0].path, "/imagenette2-160.tgz");
    assert!(!dest.path().join("imagenette2-160").exists());
}
