//! A network partition between one client and the test control plane: a TCP proxy in front
//! of the real API server that a test can cut, closing every open connection and refusing new
//! ones, as a replica that loses the API server sees it.

use kube::Client;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The proxy; dropping it cuts it too.
pub struct Partition {
    client: Client,
    cut: CancellationToken,
}

impl Partition {
    /// Starts the proxy and a client of the test control plane that goes through it.
    pub async fn start() -> Partition {
        let (_, mut config) = super::cluster::config().await;
        let upstream = format!(
            "{}:{}",
            config.cluster_url.host().expect("API server host"),
            config.cluster_url.port_u16().unwrap_or(443)
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = CancellationToken::new();
        tokio::spawn({
            let cut = cut.clone();
            async move {
                loop {
                    let mut inbound = tokio::select! {
                        () = cut.cancelled() => return,
                        accepted = listener.accept() => match accepted {
                            Ok((inbound, _)) => inbound,
                            Err(_) => continue,
                        },
                    };
                    let (cut, upstream) = (cut.clone(), upstream.clone());
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        tokio::select! {
                            () = cut.cancelled() => {}
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        }
                    });
                }
            }
        });
        // The serving certificate names 127.0.0.1, the proxy's address too.
        config.cluster_url = format!("https://{addr}").parse().unwrap();
        let client = Client::try_from(config).expect("a client through the proxy");
        client
            .apiserver_version()
            .await
            .expect("the test control plane answers through the proxy");
        Partition { client, cut }
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// From now on the client reaches nothing.
    pub fn cut(&self) {
        self.cut.cancel();
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.cut.cancel();
    }
}
