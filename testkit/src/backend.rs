//! A backend running in this process on a port bound before it starts,
//! with the settings, clients and command helpers the tests use against it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use tokio::net::TcpListener;
use tokio::sync::watch;
use uplink::backend::{BackendConfig, Core, Server};
use uplink::ctl::Admin;
use uplink::proto;
use uplink::secret::{Kind, Secret};
use uplink::tls::Trust;

use crate::waits::wait_for;

/// A backend running in this process.
pub struct TestBackend {
    /// Its data directory (store, CA, certificates).
    pub dir: PathBuf,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its URL, `https://127.0.0.1:<port>`.
    pub url: Uri,
    /// The CA it generated, which agents and clients trust.
    pub ca: PathBuf,
    /// The token of the admin API.
    pub admin_token: Secret,
    /// The token agents enroll with.
    pub enroll_token: Secret,
    /// Its core, for checks the admin API does not offer.
    pub core: Arc<Core>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// Settings it was started with.
    pub config: BackendConfig,
}

impl TestBackend {
    /// Settings used by tests: short heartbeats, the tokens given.
    pub fn config(dir: &Path) -> BackendConfig {
        let mut cfg = BackendConfig::new(dir);
        cfg.hostnames = vec!["127.0.0.1".into(), "localhost".into()];
        cfg.admin_token = Some(Secret::generate(Kind::Admin));
        cfg.enroll_token = Some(Secret::generate(Kind::Enrollment));
        cfg.heartbeat = Duration::from_secs(2);
        cfg.grace = Duration::from_secs(2);
        cfg
    }

    /// Starts on 127.0.0.1 with a fresh port.
    pub async fn start(dir: &Path) -> TestBackend {
        Self::start_with(Self::config(dir), "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts with `cfg` on `addr` (a previous backend's address to
    /// restart on the same port).
    pub async fn start_with(cfg: BackendConfig, addr: SocketAddr) -> TestBackend {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("cannot bind {addr}: {e}"));
        let server = Server::new(cfg.clone(), listener)
            .await
            .expect("backend starts");
        let info = server.info().clone();
        let core = server.core();
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            server
                .run(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await
                .expect("backend runs");
        });
        TestBackend {
            dir: cfg.data_dir.clone(),
            addr: info.addr,
            url: format!("https://127.0.0.1:{}", info.addr.port())
                .parse()
                .unwrap(),
            ca: info.ca_file.clone().expect("generated CA"),
            admin_token: cfg.admin_token.clone().unwrap(),
            enroll_token: cfg.enroll_token.clone().unwrap(),
            core,
            stop,
            task,
            config: cfg,
        }
    }

    /// Stops and waits until the port is closed.
    pub async fn stop(self) -> (BackendConfig, SocketAddr) {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("backend stops within 10 s")
            .expect("backend task");
        (self.config, self.addr)
    }

    /// Trust settings for the backend's CA only.
    pub fn trust(&self) -> Trust {
        Trust {
            ca_files: vec![self.ca.clone()],
            skip_os_store: true,
        }
    }

    /// An admin client.
    pub fn admin(&self) -> Admin {
        Admin::new(&self.url, &self.net(), self.admin_token.clone())
    }

    /// A client of the agent service over gRPC on a direct connection,
    /// with the keepalive an agent uses.
    pub async fn agent_grpc(
        &self,
    ) -> proto::agent_service_client::AgentServiceClient<tonic::transport::Channel> {
        let keepalive = Duration::from_secs(10);
        let channel = uplink::client::grpc_channel(&self.url, &self.net(), keepalive, keepalive)
            .await
            .expect("gRPC channel");
        proto::agent_service_client::AgentServiceClient::new(channel)
    }

    /// Direct connections trusting the backend's CA.
    pub fn net(&self) -> uplink::net::Net {
        let tls = uplink::tls::client_config(&self.trust()).expect("client TLS");
        uplink::net::Net::new(tls, uplink::net::ProxySettings::direct())
    }
}

/// Finds the agent reporting `hostname`, waiting until it is connected on
/// `transport` ("grpc" or "longpoll").
pub async fn connected_agent(admin: &Admin, hostname: &str, transport: &str) -> proto::AgentView {
    wait_for(
        Duration::from_secs(20),
        &format!("agent {hostname} connected on {transport}"),
        || async {
            let agents = admin.agents("").await.ok()?;
            agents.into_iter().find(|a| {
                a.hostname == hostname
                    && a.connected
                    && uplink::ctl::transport_name(a.transport) == transport
            })
        },
    )
    .await
}

/// A ping spec.
pub fn ping(delay_ms: u32, payload: &str) -> proto::CommandSpec {
    proto::CommandSpec {
        kind: Some(proto::command_spec::Kind::Ping(proto::Ping {
            delay_ms,
            payload: payload.into(),
        })),
    }
}

/// Waits for a command's result.
pub async fn result_of(admin: &Admin, id: &str, timeout: Duration) -> proto::CommandView {
    let view = admin.command(id, timeout).await.expect("GetCommand");
    assert_eq!(
        view.state,
        proto::CommandState::Done as i32,
        "command {id} not done within {timeout:?}: {view:?}"
    );
    view
}
