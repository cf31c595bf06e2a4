//! `blockdelta qmp SOCKET COMMAND [ARGUMENTS]`: runs one QMP command on a daemon's
//! monitor and prints its `return` value as JSON (for scripts and the README's guide,
//! where no QMP shell is installed).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use qmp_client::QmpClient;
use serde_json::Value;

/// The arguments of `blockdelta qmp`.
#[derive(Debug, clap::Args)]
pub struct QmpArgs {
    /// The monitor socket.
    socket: PathBuf,
    /// The command, e.g. `query-named-block-nodes`.
    command: String,
    /// Its arguments, a JSON object.
    arguments: Option<String>,
}

/// Runs `blockdelta qmp`.
pub fn run(args: &QmpArgs) -> anyhow::Result<ExitCode> {
    let arguments: Value = match &args.arguments {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| anyhow::anyhow!("the arguments are not JSON: {e}"))?,
        None => Value::Null,
    };
    if !arguments.is_null() && !arguments.is_object() {
        anyhow::bail!("the arguments must be a JSON object");
    }
    let mut q = QmpClient::connect(&args.socket, Duration::from_secs(30))?;
    let reply = q.execute(&args.command, arguments)?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    Ok(ExitCode::SUCCESS)
}
