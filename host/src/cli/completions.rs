//! `wasmrpc completions`: shell completions, generated from the flags.

use clap::Args;
use clap_complete::Shell;

use super::common::Failure;

/// Print a completion script for a shell.
///
/// Examples: `wasmrpc completions bash > /etc/bash_completion.d/wasmrpc`;
/// `wasmrpc completions zsh > "${fpath[1]}/_wasmrpc"`;
/// `wasmrpc completions fish > ~/.config/fish/completions/wasmrpc.fish`
#[derive(Debug, Args)]
pub(super) struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: Shell,
}

pub(super) fn run(args: CompletionsArgs, mut cli: clap::Command) -> Result<(), Failure> {
    use std::io::Write as _;
    // Into memory first: clap_complete panics on a failed write, and a
    // reader that stops early (`| head`) closes the pipe.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cli, "wasmrpc", &mut script);
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&script).and_then(|()| stdout.flush()) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure::Failed(
            anyhow::anyhow!("failed to write the completions: {error}"),
        )),
        // Whoever closed the pipe has what it wanted.
        _ => Ok(()),
    }
}
