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
    /// Seconds to keep serving after SIGTERM, so that proxies still sending here learn that
    /// the endpoint is gone (through the controller) before it stops answering. 0: exit at once.
    #[arg(long, default_value_t = 0)]
    shutdown_delay_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let echo = kanali_e2e::start_echo(args.listen, &args.name).await?;
    eprintln!("kanali-echo listening on {}", echo.addr);
    // SIGTERM too: as a container's PID 1 a signal without a handler is ignored, and each
    // deleted echo pod would wait out its whole grace period before being killed. An echo
    // server has nothing to drain.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    if args.shutdown_delay_secs > 0 {
        eprintln!(
            "kanali-echo: serving {} s more before exiting",
            args.shutdown_delay_secs
        );
        tokio::time::sleep(std::time::Duration::from_secs(args.shutdown_delay_secs)).await;
    }
    Ok(())
}
