//! The fleetscan broker: the central, stateless gRPC server between agents, scanner workers,
//! applications and the store.
//!
//! It serves `AgentService` (decisions for file accesses), `WorkerService` (jobs for scanner
//! workers), `ScanService` (voluntary scans), `AdminService` (read-only views), gRPC health and
//! reflection, all on one listener. Verdicts are found in a memory cache, then the store, then
//! by one scan per content (single-flight) on the pool's workers; verdicts and access records
//! are written behind the decisions, never on their path.
//!
//! Three layers, each using only the ones beneath it:
//! - [`services`]: the gRPC services, the only code that sees protocol types: each handler
//!   converts, asks the layer below, converts back; stream mechanics live there too;
//! - [`access`], where an access (and a voluntary scan) is decided, and [`admin`], the
//!   protocol-free admin views;
//! - [`engine`]: what the broker knows and can find out about contents (cache, store, flights,
//!   jobs, the fleet, the write-behind queue), behind methods named by intent.
//!
//! Beside them: [`config`], [`error`] (the one place errors become statuses) and [`shutdown`].

pub mod access;
pub mod admin;
pub mod config;
pub mod engine;
pub mod error;
pub mod services;
pub mod shutdown;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fleetscan_proto::v1::admin_service_server::AdminServiceServer;
use fleetscan_proto::v1::agent_service_server::AgentServiceServer;
use fleetscan_proto::v1::scan_service_server::ScanServiceServer;
use fleetscan_proto::v1::worker_service_server::WorkerServiceServer;
use fleetscan_proto::{FILE_DESCRIPTOR_SET, MAX_MESSAGE_SIZE};
use fleetscan_store::Store;
use tokio::net::TcpListener;
use tracing::{info, warn};

pub use config::BrokerConfig;
pub use error::BrokerError;

use crate::admin::Views;
use crate::engine::Engine;
use crate::engine::writer::{WriteQueue, spawn_writer, write_behind};
use crate::services::admin::AdminSvc;
use crate::services::agent::AgentSvc;
use crate::services::scan::ScanSvc;
use crate::services::worker::WorkerSvc;
use crate::shutdown::Signal;

/// How long open streams get to end after shutdown before connections are dropped.
const GRACE: Duration = Duration::from_secs(5);
/// How long the write-behind queue gets to drain on shutdown; the rest is counted as lost.
const DRAIN: Duration = Duration::from_secs(10);
/// TCP keepalive and HTTP/2 pings, so that a vanished peer is noticed.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// A broker, connected to its store, ready to serve.
pub struct Broker {
    engine: Arc<Engine>,
    store: Store,
    queue: WriteQueue,
    stop: Signal,
}

/// The largest HTTP/2 frame the broker accepts (a 1 MiB content chunk and its framing).
const HTTP2_MAX_FRAME: u32 = 2 * 1024 * 1024 - 1;
/// Per-stream and per-connection receive windows: a few chunks in flight per upload.
const HTTP2_STREAM_WINDOW: u32 = 8 * 1024 * 1024;
const HTTP2_CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

impl Broker {
    /// Connects the store (applies migrations).
    pub async fn new(config: BrokerConfig) -> Result<Broker, BrokerError> {
        let store = Store::connect(&config.store_url).await?;
        let (writer, queue) = write_behind(config.write_queue);
        let (stop, _) = shutdown::channel();
        let engine = Arc::new(Engine::new(config, store.clone(), writer)?);
        // Before the first agent is served.
        engine.prepare().await?;
        Ok(Broker {
            engine,
            store,
            queue,
            stop,
        })
    }

    /// The broker's engine, e.g. to replace its tenancy while it serves
    /// ([`Engine::set_tenancy`]).
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.clone()
    }

    /// Serves AgentService, WorkerService, ScanService, AdminService, grpc.health.v1 and
    /// reflection on `listener` until `shutdown` resolves, then flushes the write-behind queue.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), BrokerError> {
        let Broker {
            engine,
            store,
            queue,
            stop,
        } = self;
        let writer = spawn_writer(queue, store.clone());
        let fleet = engine.spawn_fleet_sync(stop.subscribe());

        let agent = AgentServiceServer::new(AgentSvc::new(engine.clone(), stop.subscribe()))
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let worker = WorkerServiceServer::new(WorkerSvc::new(engine.clone(), stop.subscribe()))
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let scan = ScanServiceServer::new(ScanSvc::new(engine.clone()))
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let admin = AdminServiceServer::new(AdminSvc::new(Views::new(engine.clone(), store)))
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<AgentServiceServer<AgentSvc>>().await;
        health.set_serving::<WorkerServiceServer<WorkerSvc>>().await;
        health.set_serving::<ScanServiceServer<ScanSvc>>().await;
        health.set_serving::<AdminServiceServer<AdminSvc>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;

        let address = listener.local_addr().ok();
        let mut stopped = stop.subscribe();
        // The builder's TCP options apply only to listeners tonic binds itself; an incoming
        // stream of our own needs them set here. Without TCP_NODELAY a small decision written
        // right after a large content transfer waits for a delayed ACK (~40 ms) under Nagle.
        let incoming = tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(KEEPALIVE));
        let server = tonic::transport::Server::builder()
            .tcp_keepalive(Some(KEEPALIVE))
            .http2_keepalive_interval(Some(KEEPALIVE))
            .http2_keepalive_timeout(Some(KEEPALIVE))
            // Content arrives in chunks of up to 1 MiB (agents, scan clients): let a chunk
            // travel as one HTTP/2 frame instead of 64, and let several be in flight.
            .max_frame_size(Some(HTTP2_MAX_FRAME))
            .initial_stream_window_size(Some(HTTP2_STREAM_WINDOW))
            .initial_connection_window_size(Some(HTTP2_CONNECTION_WINDOW))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(agent)
            .add_service(worker)
            .add_service(scan)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, async move {
                stopped.recv().await;
            });
        let mut server = tokio::spawn(server);
        info!(broker_id = %engine.config().broker_id, address = ?address, "broker serving");

        let result = tokio::select! {
            finished = &mut server => Some(finished),
            () = shutdown => None,
        };
        // Ends every long-lived stream, so that the graceful shutdown can complete.
        stop.shutdown();
        let result = match result {
            Some(finished) => finished
                .map_err(BrokerError::from)
                .and_then(|r| r.map_err(BrokerError::from)),
            None => match tokio::time::timeout(GRACE, &mut server).await {
                Ok(finished) => finished
                    .map_err(BrokerError::from)
                    .and_then(|r| r.map_err(BrokerError::from)),
                Err(_) => {
                    warn!("connections still open after the grace period; dropping them");
                    server.abort();
                    Ok(())
                }
            },
        };
        health
            .set_not_serving::<AgentServiceServer<AgentSvc>>()
            .await;
        let _ = fleet.await;
        let lost = writer.shutdown(DRAIN).await;
        info!(records_lost = lost, "broker stopped");
        result
    }
}
