//! Hostile files: every reader of outside input (`support/readers.rs`) gets a few thousand
//! mutations of real files (bit flips, truncations, splices, size fields set to huge values,
//! numbers in text made absurd) and must answer each with `Ok` or an error, within a time and
//! memory bound: no panic, abort, hang or runaway allocation.
//!
//! `ZOO_HOSTILE_INPUTS` sets the inputs per reader (default 1500). The input being read is kept
//! in `target/hostile-inputs/<reader>` so that a crash leaves it behind. The long campaigns
//! run under cargo-fuzz (`fuzz/`).

#[path = "support/readers.rs"]
mod readers;

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Live heap bytes of the whole test process above which an allocation fails (and the process
/// aborts, naming the size): readers run two at a time, each may legitimately hold a few
/// hundred MiB.
const HEAP_LIMIT: usize = 3 << 30;

/// The longest one input may take.
const TIME_LIMIT: Duration = Duration::from_secs(10);

struct Bounded;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size() > HEAP_LIMIT {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            let message = format!(
                "hostile_files: an allocation of {} bytes would pass the heap limit of {HEAP_LIMIT}\n",
                layout.size()
            );
            // SAFETY: writing a buffer to stderr.
            unsafe { libc::write(2, message.as_ptr().cast(), message.len()) };
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Bounded = Bounded;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that size and count fields are set to.
const HUGE: [u64; 6] = [
    0xffff_ffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff_ffff_ffff,
    0x0000_0001_0000_0000,
    0x7fff_ffff_ffff_fff0,
];

/// Numbers that replace numbers in text formats.
const ABSURD: [&str; 7] = [
    "99999999999999999999",
    "4294967296",
    "-1",
    "0",
    "1e309",
    "NaN",
    "16777217",
];

/// One mutation of `seed` (another seed `other` for splices), and what it did.
fn mutate(seed: &[u8], other: &[u8], rng: &mut Rng) -> (Vec<u8>, &'static str) {
    let mut b = seed.to_vec();
    let kind = rng.below(7);
    match kind {
        0 => {
            for _ in 0..1 + rng.below(8) {
                if !b.is_empty() {
                    let i = rng.below(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
            }
            (b, "bit flips")
        }
        1 => {
            b.truncate(rng.below(b.len() + 1));
            (b, "truncation")
        }
        2 => {
            let at = rng.below(b.len() + 1);
            let from = rng.below(other.len() + 1);
            let len = rng.below(other.len() - from + 1).min(4096);
            let cut = rng.below(b.len() - at + 1).min(4096);
            b.splice(at..at + cut, other[from..from + len].iter().copied());
            (b, "splice")
        }
        3 if b.len() >= 8 => {
            // A size field: 4 or 8 bytes at an aligned offset near the start (where headers
            // are), little- or big-endian.
            let width = if rng.below(2) == 0 { 4 } else { 8 };
            let span = b.len().min(512) - width + 1;
            let at = rng.below(span) / width * width;
            let value = HUGE[rng.below(HUGE.len())];
            let bytes = if rng.below(2) == 0 {
                value.to_le_bytes()
            } else {
                value.to_be_bytes()
            };
            let skip = if rng.below(2) == 0 { 0 } else { 8 - width };
            b[at..at + width].copy_from_slice(&bytes[skip..skip + width]);
            (b, "size field")
        }
        4 => {
            // A run of ASCII digits becomes an absurd number.
            let starts: Vec<usize> = (0..b.len())
                .filter(|&i| b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_digit()))
                .collect();
            if starts.is_empty() {
                b.push(b'9');
                return (b, "number");
            }
            let at = starts[rng.below(starts.len())];
            let end = (at..b.len())
                .find(|&i| !b[i].is_ascii_digit())
                .unwrap_or(b.len());
            b.splice(at..end, ABSURD[rng.below(ABSURD.len())].bytes());
            (b, "number")
        }
        5 => {
            // A range repeated: nesting, repeated keys, duplicated records.
            if b.is_empty() {
                return (b, "repeat");
            }
            let from = rng.below(b.len());
            let len = (1 + rng.below(b.len() - from)).min(2048);
            let copy = b[from..from + len].to_vec();
            for _ in 0..1 + rng.below(8) {
                let at = rng.below(b.len() + 1);
                b.splice(at..at, copy.iter().copied());
            }
            (b, "repeat")
        }
        _ => {
            let len = 1 + rng.below(64);
            let at = rng.below(b.len() + 1);
            let noise: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            b.splice(at..at, noise);
            (b, "random bytes")
        }
    }
}

/// The seeds, written once per process.
fn seeds() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("zoo-hostile-seeds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        readers::write_seeds(&dir);
        dir
    })
}

fn seeds_of(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut found: Vec<(String, Vec<u8>)> = std::fs::read_dir(seeds().join(target))
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
            )
        })
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no seeds for {target}");
    found
}

/// Runs `inputs` mutations of the target's seeds; every seed itself must be read without
/// error. Fails on any panic or slow input, naming the seed, the mutation and the saved input.
fn hostile(name: &str) {
    let target = readers::target(name);
    let inputs: usize = std::env::var("ZOO_HOSTILE_INPUTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1500);
    let seeds = seeds_of(name);
    let scratch = readers::scratch();
    let keep = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/hostile-inputs");
    std::fs::create_dir_all(&keep).unwrap();
    let kept = keep.join(name);
    for (seed, bytes) in &seeds {
        if let Err(e) = (target.read)(&scratch, bytes) {
            panic!("{name}: the real file `{seed}` is refused: {e}");
        }
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    let (mut refused, mut slowest) = (0, Duration::ZERO);
    let mut failures = Vec::new();
    for i in 0..inputs {
        let (seed, bytes) = &seeds[rng.below(seeds.len())];
        let other = &seeds[rng.below(seeds.len())].1;
        let (input, mutation) = mutate(bytes, other, &mut rng);
        std::fs::write(&kept, &input).unwrap();
        let start = Instant::now();
        let outcome =
            std::panic::catch_unwind(AssertUnwindSafe(|| (target.read)(&scratch, &input)));
        let took = start.elapsed();
        slowest = slowest.max(took);
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                refused += 1;
                assert!(!message.trim().is_empty(), "{name}: an empty error message");
            }
            Err(_) => failures.push(format!("input {i}: {mutation} of `{seed}` panicked")),
        }
        if took > TIME_LIMIT {
            failures.push(format!("input {i}: {mutation} of `{seed}` took {took:?}"));
        }
        if !failures.is_empty() {
            let failed = keep.join(format!("{name}-failed-{i}"));
            std::fs::write(&failed, &input).unwrap();
            panic!(
                "{name}: {} (the input is saved as {})",
                failures.join("; "),
                failed.display()
            );
        }
    }
    eprintln!(
        "{name}: {inputs} mutated inputs of {} seeds: {refused} refused with an error, {} read, slowest {slowest:?}",
        seeds.len(),
        inputs - refused
    );
}

#[test]
fn hostile_specs() {
    hostile("spec");
}

#[test]
fn hostile_keras_weights() {
    hostile("keras_h5");
}

#[test]
fn hostile_weights() {
    hostile("weights");
}

#[test]
fn hostile_checkpoints() {
    hostile("checkpoint");
}

#[test]
fn hostile_zoo_models() {
    hostile("zoo_model");
}

#[test]
fn hostile_idx_files() {
    hostile("idx");
}

#[test]
fn hostile_images() {
    hostile("image");
}

#[test]
fn hostile_run_configs() {
    hostile("run_config");
}

#[test]
fn hostile_repo_configs() {
    hostile("repo_config");
}

/// A gzip bomb: a few kilobytes that decompress to 2 GiB behind an IDX header that promises
/// 8 values. Only what the header promises is decompressed.
#[test]
fn an_idx_gzip_bomb_is_refused_after_what_its_header_promises() {
    use std::io::Write;
    let dir = readers::scratch().join("bomb");
    std::fs::create_dir_all(&dir).unwrap();
    let (_, labels) = readers::idx_files(8);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&labels).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..2048 {
        gz.write_all(&zeros).unwrap();
    }
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 4 << 20, "{}", bomb.len());
    std::fs::write(dir.join("t10k-labels-idx1-ubyte.gz"), &bomb).unwrap();
    let (images, _) = readers::idx_files(8);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&images).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte.gz"), gz.finish().unwrap()).unwrap();
    let start = Instant::now();
    let err = zoo::data::FashionMnist::open(&dir, zoo::data::Split::Validation, 32)
        .err()
        .expect("the bomb is refused")
        .to_string();
    assert!(
        err.contains("promises 8 values") && err.contains("or more"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// Writes the seeds of every reader to `$ZOO_FUZZ_SEEDS/<reader>/` (the fuzz campaign's
/// `fuzz/seeds`, see `fuzz/run.sh`).
#[test]
#[ignore = "writes the fuzz campaign's seeds; fuzz/run.sh runs it"]
fn write_fuzz_seeds() {
    let dir = std::env::var_os("ZOO_FUZZ_SEEDS").expect("ZOO_FUZZ_SEEDS names the folder");
    readers::write_seeds(Path::new(&dir));
}
