// mimalloc: the server allocates and frees many small buffers per call on several
// threads (HTTP/2 frames, protobuf messages, query arguments); glibc's allocator spent
// a fifth of the server's time there under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    dmpay::cli::main()
}
