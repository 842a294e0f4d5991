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
    clap_complete::generate(args.shell, &mut cli, "wasmrpc", &mut std::io::stdout());
    Ok(())
}
