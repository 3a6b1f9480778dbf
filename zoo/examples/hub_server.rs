//! Runs the test Hugging Face Hub server until killed, for trying clients against it by hand:
//!
//! ```sh
//! cargo run -p zoo --example hub_server -- --port 8765 --dir /tmp/hub
//! HF_ENDPOINT=http://127.0.0.1:8765 HF_HUB_DISABLE_XET=1 hf upload org/name ./folder
//! ```
//!
//! It accepts any token (or none), stores repos under `--dir` and serves them again when
//! restarted on the same directory. See `tests/support/hub_server.rs` for what it speaks.

// Only starting the server is needed here, not the tests' fault knobs and request log.
#[allow(dead_code)]
#[path = "../../tests/support/hub_server.rs"]
mod hub_server;

use std::path::PathBuf;

use clap::Parser;

/// Serves model repos over the Hugging Face Hub protocol on 127.0.0.1.
#[derive(Parser)]
struct Args {
    /// Port of the hub (0: any free port; the URL printed says which).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Directory holding the repos, kept across restarts.
    #[arg(long)]
    dir: PathBuf,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let server = hub_server::HubServer::start_on(&args.dir, args.port)?;
    println!("{}", server.url());
    loop {
        std::thread::park();
    }
}
