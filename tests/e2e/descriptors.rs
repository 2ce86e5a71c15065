//! R1: out of file descriptors, the accept loop pauses (with backoff, counted)
//! instead of spinning, established flows go on, and accepting resumes when
//! descriptors are free again.
//!
//! A test binary of its own: it lowers the whole process's descriptor limit.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use fulcrum_tests::*;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpSocket;

/// The highest descriptor number open in this process.
fn highest_fd() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_accept_loop_pauses_and_established_flows_go_on() {
    let b = backends(1, "127.0.0.1").await;
    let server = serve(&config(1, "stock:round-robin", &backend_list(&b, None), "", ""));
    let addr = server.frontend_addr("web").unwrap();
    let flows = server.flows("web").unwrap();
    let (mut held, _) = connect(addr, None).await;
    assert_echoes(&mut held, "before").await;

    // Client sockets made now, while descriptors are free; connected later.
    let waiting: Vec<TcpSocket> = (0..8).map(|_| TcpSocket::new_v4().unwrap()).collect();
    // No descriptor left: the limit just above the highest one, every number
    // below it taken (holes filled with /dev/null).
    let original = getrlimit(Resource::Nofile);
    let limit = highest_fd() + 1;
    setrlimit(Resource::Nofile, Rlimit { current: Some(limit), maximum: original.maximum }).unwrap();
    let mut fillers = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        fillers.push(f);
    }

    // connect() needs no new descriptor; the handshakes complete in the
    // listener's backlog, and the server's accept finds no descriptor.
    let mut pending = Vec::new();
    for socket in waiting {
        pending.push(socket.connect(addr).await.unwrap());
    }
    wait_until(Duration::from_secs(10), "the accept loop to pause", || flows.accept_pauses() >= 3).await;
    assert_echoes(&mut held, "an established flow goes on").await;
    // Backoff, not a spin: pauses of 5 ms doubling to 500 ms allow a handful
    // in half a second (a spinning loop would count thousands). No event
    // marks "not spinning", so this one waits a fixed time.
    let before = flows.accept_pauses();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = flows.accept_pauses() - before;
    assert!(during <= 6, "{during} pauses in 500 ms: the accept loop spins");
    assert_eq!(flows.started(), 1, "nothing was accepted while out of descriptors");

    // Descriptors again: the waiting connections are accepted and served.
    drop(fillers);
    setrlimit(Resource::Nofile, original).unwrap();
    for stream in pending {
        let mut reader = tokio::io::BufReader::new(stream);
        let mut greeting = String::new();
        tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut greeting)).await.unwrap().unwrap();
        assert_eq!(greeting.trim(), b[0].name);
        assert_echoes(&mut reader, "after").await;
    }
    assert_eq!(flows.started(), 9);
    server.shutdown();
}
