use clap::Parser;

/// mimalloc: per-thread heaps, no arena lock on the request path (`fhirgate::allocator` says
/// how it is asked).
#[global_allocator]
static GLOBAL: fhirgate::allocator::Mimalloc = fhirgate::allocator::Mimalloc;

fn main() -> std::process::ExitCode {
    let cli = fhirgate::cli::Cli::parse();
    match fhirgate::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fhirgate: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
