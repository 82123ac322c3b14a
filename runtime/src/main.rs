//! The `stoker` binary: see `stoker --help`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
