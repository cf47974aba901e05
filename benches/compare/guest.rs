//! The test guest's serial console: commands in, "VDI …" lines out.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

pub struct Guest {
    wr: OwnedWriteHalf,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Guest {
    pub async fn connect(serial: &Path) -> Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(serial).await {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).context("QEMU's serial socket");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let (rd, wr) = stream.into_split();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut rd = BufReader::new(rd).lines();
            while let Ok(Some(line)) = rd.next_line().await {
                if let Some(l) = line.find("VDI ").map(|i| line[i..].trim_end().to_owned())
                    && tx.send(l).is_err()
                {
                    break;
                }
            }
        });
        Ok(Self { wr, lines })
    }

    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        self.next_matching(|l| l.starts_with("VDI READY"), timeout)
            .await
            .map(|_| ())
            .context("the guest never booted")
    }

    pub async fn send(&mut self, cmd: &str) -> Result<()> {
        self.wr.write_all(format!("{cmd}\n").as_bytes()).await?;
        Ok(())
    }

    /// Sends `cmd` and waits for its "VDI OK <op>".
    pub async fn cmd(&mut self, cmd: &str, op: &str) -> Result<String> {
        self.send(cmd).await?;
        self.wait_for(op, Duration::from_secs(60)).await
    }

    pub async fn wait_for(&mut self, op: &str, timeout: Duration) -> Result<String> {
        let ok = format!("VDI OK {op}");
        let line = self
            .next_matching(|l| l.starts_with(&ok) || l.starts_with("VDI ERR"), timeout)
            .await
            .with_context(|| format!("no answer to {op}"))?;
        if line.starts_with("VDI ERR") {
            bail!("guest: {line}");
        }
        Ok(line)
    }

    async fn next_matching(
        &mut self,
        want: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .context("timed out")?
                .context("serial closed")?;
            if want(&line) {
                return Ok(line);
            }
        }
    }
}
