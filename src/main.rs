fn main() -> std::process::ExitCode {
    dmpay::cli::main()
}
