//! `aviary-sample-module`: the sample module as its own small executable, so tests deploy
//! a few-MB artifact rather than the whole debug `aviary` binary.
#![forbid(unsafe_code)]

#[tokio::main(flavor = "current_thread")]
async fn main() {
    aviary_sample_module::run(std::env::args().skip(1).collect()).await;
}
