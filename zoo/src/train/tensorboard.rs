//! TensorBoard event files: the scalars of a run, readable by TensorBoard
//! (`tensorboard --logdir runs/`).
//!
//! A file is a sequence of TFRecords (length, masked CRC-32C of the length, an `Event`
//! protobuf, masked CRC-32C of the data); the first event names the format version, each
//! later one carries scalar values at a step. A resumed run starts a new file in the same
//! folder, as TensorBoard expects of a restarted writer.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use crate::Error;

/// The folder of a run's event files.
pub const FOLDER: &str = "tensorboard";

/// TensorFlow's `Event` message, the fields the zoo writes.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// TensorFlow's `Summary`: a list of tagged values.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    /// In a oneof, as in TensorFlow's message, so that 0.0 is written too.
    #[prost(oneof = "Scalar", tags = "2")]
    value: Option<Scalar>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Scalar {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
}

/// TFRecord's checksum: CRC-32C, rotated and offset.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Appends scalar events to a new event file of a run.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `<run>/tensorboard/events.out.tfevents.<seconds>.<host>.<pid>.zoo` and writes
    /// the version event.
    pub fn create(run_dir: &Path) -> Result<EventWriter, Error> {
        let dir = run_dir.join(FOLDER);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{now}.{host}.{}.zoo",
            std::process::id()
        ));
        let fail = |e: std::io::Error| Error::Write {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(&dir).map_err(fail)?;
        let file = File::create(&path).map_err(fail)?;
        let mut writer = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        writer.write(Event {
            wall_time: wall_time(),
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        })?;
        writer.flush()?;
        Ok(writer)
    }

    /// Writes `values` (tag, value) at `step`.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<(), Error> {
        let summary = Summary {
            value: values
                .iter()
                .map(|(tag, v)| Value {
                    tag: tag.to_string(),
                    value: Some(Scalar::SimpleValue(*v as f32)),
                })
                .collect(),
        };
        self.write(Event {
            wall_time: wall_time(),
            step: step as i64,
            what: Some(What::Summary(summary)),
        })
    }

    /// Writes what is buffered to the file.
    pub fn flush(&mut self) -> Result<(), Error> {
        self.out.flush().map_err(|e| self.error(e))
    }

    fn write(&mut self, event: Event) -> Result<(), Error> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc(&len).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.out.write_all(&record).map_err(|e| self.error(e))
    }

    fn error(&self, e: std::io::Error) -> Error {
        Error::Write {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_framed_with_tfrecord_checksums() {
        // CRC-32C of "123456789" is 0xE3069283 (the standard check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(7, &[("train/loss", 0.0)]).unwrap();
        w.flush().unwrap();
        let bytes = std::fs::read(&w.path).unwrap();
        let mut at = 0;
        let mut events = Vec::new();
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(len_crc, masked_crc(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            events.push(Event::decode(data).unwrap());
            at += 16 + len;
        }
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
        let Some(What::Summary(s)) = &events[1].what else {
            panic!("{:?}", events[1]);
        };
        assert_eq!(events[1].step, 7);
        // A zero is written, not left out as a protobuf default.
        assert_eq!(s.value[0].value, Some(Scalar::SimpleValue(0.0)));
    }
}
