//! The log's epochs and skipped seq ranges: what the Redis log consults when Redis may have lost
//! data (a restart, a failover, a flush), so that no seq is ever issued twice.

use async_trait::async_trait;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::backend::BackendError;
use crate::log::SeqFloor;

impl From<StoreError> for BackendError {
    fn from(e: StoreError) -> Self {
        BackendError::Unavailable(e.to_string())
    }
}

impl Store {
    /// Records a new epoch of a log partition; true when seqs were issued in an earlier epoch
    /// of it (so Redis may have lost some of them).
    pub async fn open_log_epoch(
        &self,
        prefix: &str,
        partition: u16,
        epoch: &str,
    ) -> Result<bool, StoreError> {
        let partition = i32::from(partition);
        let client = self.client().await?;
        let before = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM log_epochs
                         WHERE key_prefix = $1 AND partition = $2 AND used)",
                &[&prefix, &partition],
            )
            .await?
            .get::<_, bool>(0);
        client
            .execute(
                "INSERT INTO log_epochs (key_prefix, partition, epoch) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[&prefix, &partition, &epoch],
            )
            .await?;
        Ok(before)
    }

    /// Marks an epoch as one seqs are issued in.
    pub async fn mark_log_epoch_used(
        &self,
        prefix: &str,
        partition: u16,
        epoch: &str,
    ) -> Result<(), StoreError> {
        let partition = i32::from(partition);
        self.client()
            .await?
            .execute(
                "INSERT INTO log_epochs (key_prefix, partition, epoch, used) VALUES ($1, $2, $3, true)
                 ON CONFLICT (key_prefix, partition, epoch) DO UPDATE SET used = true",
                &[&prefix, &partition, &epoch],
            )
            .await?;
        Ok(())
    }

    /// Records that seqs `lo..=hi` of `conversation` will never hold a message.
    pub async fn record_seq_gap(
        &self,
        conversation: Uuid,
        lo: i64,
        hi: i64,
    ) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO seq_gaps (conversation_id, lo, hi) VALUES ($1, $2, $3)
                 ON CONFLICT (conversation_id, lo) DO UPDATE SET hi = GREATEST(seq_gaps.hi, EXCLUDED.hi)",
                &[&conversation, &lo, &hi],
            )
            .await?;
        Ok(())
    }

    /// The skipped ranges of `conversation` that overlap `lo..=hi`, ascending.
    pub async fn seq_gaps(
        &self,
        conversation: Uuid,
        lo: i64,
        hi: i64,
    ) -> Result<Vec<(i64, i64)>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT lo, hi FROM seq_gaps
                 WHERE conversation_id = $1 AND lo <= $3 AND hi >= $2
                 ORDER BY lo",
                &[&conversation, &lo, &hi],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}

#[async_trait]
impl SeqFloor for Store {
    async fn persisted_last_seq(&self, conversation: Uuid) -> Result<i64, BackendError> {
        Ok(self.last_seq(conversation).await?)
    }

    async fn open_epoch(
        &self,
        prefix: &str,
        partition: u16,
        epoch: &str,
    ) -> Result<bool, BackendError> {
        Ok(self.open_log_epoch(prefix, partition, epoch).await?)
    }

    async fn mark_used(
        &self,
        prefix: &str,
        partition: u16,
        epoch: &str,
    ) -> Result<(), BackendError> {
        Ok(self.mark_log_epoch_used(prefix, partition, epoch).await?)
    }

    async fn record_gap(&self, conversation: Uuid, lo: i64, hi: i64) -> Result<(), BackendError> {
        Ok(self.record_seq_gap(conversation, lo, hi).await?)
    }
}
