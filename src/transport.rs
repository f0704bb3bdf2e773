//! Client connections whose writes are coalesced.
//!
//! HTTP/2 flushes a connection every time its task runs, and under load its task runs between
//! the tasks of its streams: a live event sent to 50 subscribers on one connection became about
//! 7 `writev`s, each a trip through the kernel's TCP path (a third of the server's CPU in the
//! live benchmark). Here the connection's writes go into a buffer, and a flush only wakes a
//! writer task, which first yields to the runtime (every task that is ready, the other streams
//! included, runs and adds its frames) and then writes everything gathered in one call. When the
//! server is idle that costs one scheduler round; under load it turns many small writes into few.
//! A flush completes when its bytes are written, as the `AsyncWrite` contract asks. Off by
//! default (`server.coalesce_writes`): measured, it only pays in throughput once the CPU is
//! saturated, and costs latency there.

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::Notify,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes a connection may have waiting before its writes wait for the writer task.
const MAX_PENDING: usize = 1024 * 1024;
/// How long the writer task may still spend on a connection the server has let go of (a client
/// that stopped reading would otherwise hold it, and its socket, forever).
const GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// A server connection with coalesced writes (see the module docs).
pub struct Coalesced {
    read: OwnedReadHalf,
    shared: Arc<Shared>,
    info: TcpConnectInfo,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer task.
    flush: Notify,
    /// The server let go of the connection.
    gone: Notify,
}

#[derive(Default)]
struct State {
    pending: BytesMut,
    /// Bytes handed to this connection so far, and bytes the writer task has written: a flush
    /// completes once `written` reaches what was `appended` when it was asked for.
    appended: u64,
    written: u64,
    /// The writer task failed or stopped: what later writes report.
    error: Option<io::ErrorKind>,
    /// Shutdown asked for (the writer finishes, then shuts the socket down).
    closing: bool,
    closed: bool,
    /// The server let go of the connection: what is left gets [`GRACE`] to be written.
    dropped: bool,
    /// Writers waiting for room, or for the shutdown to complete.
    waiting: Vec<Waker>,
}

impl Coalesced {
    /// Wraps an accepted connection and starts its writer task.
    pub fn new(stream: TcpStream) -> Coalesced {
        let info = stream.connect_info();
        let (read, write) = stream.into_split();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            flush: Notify::new(),
            gone: Notify::new(),
        });
        tokio::spawn(write_loop(write, shared.clone()));
        Coalesced { read, shared, info }
    }
}

impl Drop for Coalesced {
    fn drop(&mut self) {
        // The writer task sends what is left (within GRACE), then ends.
        {
            let mut st = self.shared.state.lock().expect("transport lock");
            st.closing = true;
            st.dropped = true;
        }
        self.shared.flush.notify_one();
        self.shared.gone.notify_one();
    }
}

async fn write_loop(mut write: OwnedWriteHalf, shared: Arc<Shared>) {
    loop {
        shared.flush.notified().await;
        // Let every task that is ready run first: they add their frames to this write.
        tokio::task::yield_now().await;
        loop {
            let (data, closing) = {
                let mut st = shared.state.lock().expect("transport lock");
                (st.pending.split(), st.closing)
            };
            if data.is_empty() {
                if closing {
                    let _ = write.shutdown().await;
                    let mut st = shared.state.lock().expect("transport lock");
                    st.closed = true;
                    st.error.get_or_insert(io::ErrorKind::BrokenPipe);
                    st.waiting.drain(..).for_each(Waker::wake);
                    return;
                }
                break;
            }
            let dropped = shared.state.lock().expect("transport lock").dropped;
            let result = if dropped {
                tokio::time::timeout(GRACE, write.write_all(&data))
                    .await
                    .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
            } else {
                tokio::select! {
                    r = write.write_all(&data) => r,
                    () = async {
                        shared.gone.notified().await;
                        tokio::time::sleep(GRACE).await;
                    } => Err(io::ErrorKind::TimedOut.into()),
                }
            };
            let mut st = shared.state.lock().expect("transport lock");
            if result.is_ok() {
                st.written += data.len() as u64;
            }
            st.waiting.drain(..).for_each(Waker::wake);
            if let Err(e) = result {
                st.error = Some(e.kind());
                st.closed = true;
                return;
            }
        }
    }
}

impl AsyncRead for Coalesced {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl Coalesced {
    fn poll_append(
        &self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut st = self.shared.state.lock().expect("transport lock");
        if let Some(kind) = st.error {
            return Poll::Ready(Err(kind.into()));
        }
        if st.pending.len() >= MAX_PENDING {
            st.waiting.push(cx.waker().clone());
            drop(st);
            self.shared.flush.notify_one();
            return Poll::Pending;
        }
        let mut n = 0;
        for b in bufs {
            st.pending.extend_from_slice(b);
            n += b.len();
        }
        st.appended += n as u64;
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for Coalesced {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_append(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_append(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Hands the buffered bytes to the writer task and completes once they are written (every
    /// task that is ready gets to add its frames to the same write first).
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.shared.state.lock().expect("transport lock");
        if let Some(kind) = st.error {
            return Poll::Ready(Err(kind.into()));
        }
        if st.written >= st.appended {
            return Poll::Ready(Ok(()));
        }
        st.waiting.push(cx.waker().clone());
        drop(st);
        self.shared.flush.notify_one();
        Poll::Pending
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.shared.state.lock().expect("transport lock");
        if st.closed {
            return Poll::Ready(Ok(()));
        }
        st.closing = true;
        st.waiting.push(cx.waker().clone());
        drop(st);
        self.shared.flush.notify_one();
        Poll::Pending
    }
}

impl Connected for Coalesced {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn pair() -> (Coalesced, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, client) = tokio::join!(listener.accept(), client);
        (Coalesced::new(accepted.unwrap().0), client.unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn everything_written_arrives_in_order_and_shutdown_completes() {
        let (mut server, mut client) = pair().await;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut want = Vec::new();
        // More than MAX_PENDING in all, in writes of every size, some vectored.
        for i in 0..3000u32 {
            let chunk: Vec<u8> = (0..(i % 1500)).map(|k| (k ^ i) as u8).collect();
            if i % 3 == 0 {
                let (a, b) = chunk.split_at(chunk.len() / 2);
                let slices = [io::IoSlice::new(a), io::IoSlice::new(b)];
                let n = server.write_vectored(&slices).await.unwrap();
                assert_eq!(n, chunk.len());
            } else {
                server.write_all(&chunk).await.unwrap();
            }
            if i % 7 == 0 {
                server.flush().await.unwrap();
            }
            want.extend_from_slice(&chunk);
        }
        server.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), want);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_let_go_is_not_held_by_a_client_that_stopped_reading() {
        let (mut server, mut client) = pair().await;
        // The client reads nothing: fill the socket buffers and the pending bytes.
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0usize;
        let wait = std::time::Duration::from_millis(200);
        loop {
            match tokio::time::timeout(wait, server.write_all(&chunk)).await {
                Ok(Ok(())) => written += chunk.len(),
                _ => break,
            }
            if tokio::time::timeout(wait, server.flush()).await.is_err() {
                break;
            }
        }
        drop(server);
        tokio::time::sleep(GRACE + std::time::Duration::from_millis(500)).await;
        // The writer gave up: the client gets part of it and then the end, not everything.
        let mut got = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.read_to_end(&mut got),
        )
        .await
        .expect("the connection ends");
        assert!(got.len() < written, "{} of {written}", got.len());
    }

    #[tokio::test]
    async fn writes_fail_once_the_peer_is_gone() {
        let (mut server, client) = pair().await;
        drop(client);
        let mut failed = false;
        for _ in 0..200 {
            if server.write_all(&[0; 64 * 1024]).await.is_err() || server.flush().await.is_err() {
                failed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(failed, "writes to a closed peer must fail");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_completes_only_once_its_bytes_are_written() {
        let (mut server, mut client) = pair().await;
        // The client reads nothing: the flush of more than the socket buffers hold cannot finish.
        let chunk = vec![1u8; 8 * 1024 * 1024];
        server.write_all(&chunk).await.unwrap();
        let flushed =
            tokio::time::timeout(std::time::Duration::from_millis(300), server.flush()).await;
        assert!(flushed.is_err(), "flushed before the bytes were written");
        // Once the client reads, it does.
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; chunk.len()];
            client.read_exact(&mut got).await.unwrap();
        });
        tokio::time::timeout(std::time::Duration::from_secs(10), server.flush())
            .await
            .expect("flushed once read")
            .unwrap();
        reader.await.unwrap();
    }
}
