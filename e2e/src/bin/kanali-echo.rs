//! `kanali-echo`: an HTTP server that answers every request with a JSON description of it.
//! The upstream of the `make run` demo.

use std::net::SocketAddr;

use clap::Parser;

/// Echo upstream for demos and tests.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:18000")]
    listen: SocketAddr,
    /// Name returned in every answer.
    #[arg(long, default_value = "echo")]
    name: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let echo = kanali_e2e::start_echo(args.listen, &args.name).await?;
    eprintln!("kanali-echo listening on {}", echo.addr);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
