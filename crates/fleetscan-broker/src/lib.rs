//! The fleetscan broker: the central, stateless gRPC server between agents, scanner workers,
//! applications and the store.
//!
//! It serves `AgentService` (decisions for file accesses), `WorkerService` (jobs for scanner
//! workers), `ScanService` (voluntary scans), `AdminService` (read-only views), gRPC health and
//! reflection, all on one listener. Verdicts are found in a memory cache, then the store, then
//! by one scan per content (single-flight) on the pool's workers; verdicts and access records
//! are written behind the decisions, never on their path.
//!
//! Module map: [`engine`] holds the shared state and the verdict path; [`agent`], [`worker`],
//! [`scan`] and [`admin`] are the gRPC edges (the only modules that know protocol types, with
//! [`content`]); [`cache`], [`flight`], [`queue`], [`decide`] and [`scheduler`] are pure logic;
//! [`writer`] is the write-behind queue; [`error`] maps errors to statuses in one place.

pub mod admin;
pub mod agent;
pub mod cache;
pub mod config;
pub mod content;
pub mod decide;
pub mod engine;
pub mod error;
pub mod fleet;
pub mod flight;
pub mod queue;
pub mod scan;
pub mod scheduler;
pub mod shutdown;
pub mod stats;
mod store_sink;
pub mod stored;
pub mod worker;
pub mod writer;

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

use crate::admin::AdminSvc;
use crate::agent::AgentSvc;
use crate::engine::Engine;
use crate::scan::ScanSvc;
use crate::shutdown::Signal;
use crate::worker::WorkerSvc;
use crate::writer::{WriteQueue, spawn_writer, write_behind};

/// How long open streams get to end after shutdown before connections are dropped.
const GRACE: Duration = Duration::from_secs(5);
/// How long the write-behind queue gets to drain on shutdown; the rest is counted as lost.
const DRAIN: Duration = Duration::from_secs(10);
/// TCP keepalive and HTTP/2 pings, so that a vanished peer is noticed.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// A broker, connected to its store, ready to serve.
pub struct Broker {
    engine: Arc<Engine>,
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
        let engine = Arc::new(Engine::new(config, store, writer)?);
        // The fleet's generation and pool identities before the first agent is served, so that
        // agents moving here from another replica keep their caches.
        let fleet = engine.store.fleet_state().await?;
        engine.apply_fleet(&fleet);
        // A SQLite store is this broker's alone: once what it holds is read, a new content's
        // look-up (which must miss) is skipped.
        if let Some(filter) = &engine.stored_contents {
            tokio::spawn(stored::seed(filter.clone(), engine.store.clone()));
        }
        Ok(Broker {
            engine,
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
            queue,
            stop,
        } = self;
        let writer = spawn_writer(queue, engine.store.clone());
        let fleet = {
            let applier = engine.clone();
            engine
                .fleet
                .spawn(move |state| applier.apply_fleet(&state), stop.subscribe())
        };

        let agent = AgentServiceServer::new(AgentSvc {
            engine: engine.clone(),
            shutdown: stop.subscribe(),
        })
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let worker = WorkerServiceServer::new(WorkerSvc {
            engine: engine.clone(),
            shutdown: stop.subscribe(),
        })
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let scan = ScanServiceServer::new(ScanSvc {
            engine: engine.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let admin = AdminServiceServer::new(AdminSvc {
            engine: engine.clone(),
        })
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
        info!(broker_id = %engine.config.broker_id, address = ?address, "broker serving");

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
