//! `aviary-sample-module`: `aviary sample-module` as its own small executable, so tests
//! deploy a few-MB artifact rather than the whole debug `aviary` binary.

#[tokio::main(flavor = "current_thread")]
async fn main() {
    aviary_control_plane::cli::sample::run(std::env::args().skip(1).collect()).await;
}
