//! A job's way through a session: its first message, its chunks reassembled and verified
//! against the size it declared, its scan on the shared slots, a cancel, and its answer.
//!
//! It must never buffer more bytes of a job than the job declared or than `max_file_size`
//! allows, never answer a cancelled job, and never leave a job's credit unreleased.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fleetscan_core::Sha256;
use fleetscan_proto::v1;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::End;
use super::stream::Session;
use crate::ScanOutcome;
use crate::assembly::{Assembly, Push};
use crate::slots::{Done, ScanJob};

impl Session<'_> {
    pub(super) fn on_job(&mut self, job: v1::Job) -> Result<(), End> {
        let job_id = job.job_id;
        if self.assembling.contains_key(&job_id) || self.scanning.contains_key(&job_id) {
            warn!(job_id, "broker sent a job id already held; ignored");
            return Ok(());
        }
        if self.drain_deadline.is_some() {
            self.outstanding = self.outstanding.saturating_sub(1);
            return self.send_result(
                job_id,
                &ScanOutcome::error("worker is shutting down", true),
                0,
            );
        }
        if self.outstanding == 0 {
            // The broker broke flow control. Refuse without holding the job, so the bound on
            // held content stays what the worker granted.
            warn!(broker = %self.broker, job_id, "broker sent a job beyond the credits granted");
            return self.send_result(
                job_id,
                &ScanOutcome::error("job beyond the credits granted", true),
                0,
            );
        }
        self.outstanding -= 1;
        let deadline = Instant::now()
            + match job.deadline_ms {
                0 => self.shared.timing.default_job_deadline,
                ms => Duration::from_millis(u64::from(ms)),
            };
        debug!(
            job_id,
            sha256 = %job.sha256,
            size = job.size,
            tenant = %job.tenant,
            attempt = job.attempt,
            path_hint = %job.path_hint,
            "job received"
        );
        match Assembly::start(
            &job.sha256,
            job.size,
            self.shared.config.max_file_size,
            deadline,
        ) {
            Ok(assembly) if assembly.is_empty_content() => {
                let sha256 = assembly.sha256;
                self.start_scan(job_id, sha256, assembly.into_content());
                Ok(())
            }
            Ok(assembly) => {
                self.assembling.insert(job_id, assembly);
                Ok(())
            }
            Err(refusal) => {
                self.send_result(job_id, &refusal, 0)?;
                self.release_slot()
            }
        }
    }

    pub(super) fn on_chunk(&mut self, chunk: v1::JobChunk) -> Result<(), End> {
        let Some(assembly) = self.assembling.get_mut(&chunk.job_id) else {
            // A chunk of a job cancelled, refused or timed out a moment ago.
            debug!(
                job_id = chunk.job_id,
                "chunk for a job not being received; ignored"
            );
            return Ok(());
        };
        match assembly.push(chunk.offset, chunk.data, chunk.last) {
            Push::More => Ok(()),
            Push::Complete(content) => {
                let sha256 = assembly.sha256;
                self.assembling.remove(&chunk.job_id);
                self.start_scan(chunk.job_id, sha256, content);
                Ok(())
            }
            Push::Refused(refusal) => {
                self.assembling.remove(&chunk.job_id);
                warn!(
                    broker = %self.broker,
                    job_id = chunk.job_id,
                    detail = refusal.detail.as_deref().unwrap_or(""),
                    "job content refused"
                );
                self.send_result(chunk.job_id, &refusal, 0)?;
                self.release_slot()
            }
        }
    }

    pub(super) fn on_cancel(&mut self, cancel: v1::CancelJob) -> Result<(), End> {
        let job_id = cancel.job_id;
        if self.assembling.remove(&job_id).is_some() {
            debug!(job_id, reason = %cancel.reason, "job cancelled while receiving");
            return self.release_slot();
        }
        if let Some(cancelled) = self.scanning.get(&job_id) {
            debug!(job_id, reason = %cancel.reason, "job cancelled while scanning");
            cancelled.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Readies the content for the scan slots, which verify and scan it on a blocking thread,
    /// at most `credits` at once over every session of every broker; it is handed over at the
    /// end of the session's turn.
    fn start_scan(&mut self, job_id: u64, expected: Sha256, content: Bytes) {
        let cancelled = Arc::new(AtomicBool::new(false));
        self.scanning.insert(job_id, Arc::clone(&cancelled));
        self.ready.push(ScanJob {
            job_id,
            expected,
            content,
            cancelled,
            done: self.done_tx.clone(),
        });
    }

    /// A scan is over: answer unless cancelled, and free the slot. Takes every other finished
    /// scan already waiting too, so that their slots go back in one grant.
    pub(super) fn on_done(&mut self, done: Done) -> Result<(), End> {
        self.finish(done)?;
        while let Ok(done) = self.done_rx.try_recv() {
            self.finish(done)?;
        }
        Ok(())
    }

    fn finish(&mut self, done: Done) -> Result<(), End> {
        let Done { job_id, scanned } = done;
        let Some(cancelled) = self.scanning.remove(&job_id) else {
            return Ok(());
        };
        match scanned {
            Some((outcome, scan_micros)) if !cancelled.load(Ordering::Acquire) => {
                debug!(
                    job_id,
                    verdict = outcome.kind.as_str(),
                    scan_micros,
                    "job scanned"
                );
                self.send_result(job_id, &outcome, scan_micros)?;
            }
            _ => debug!(job_id, "cancelled job's slot freed"),
        }
        self.release_slot()
    }
}
