//! What the card processor reports after its calls (a payout returned, a capture
//! disputed, a dispute decided), applied in order from a cursor by the resolver.

use super::Payments;
use crate::kernel::error::{Error, Result};
use crate::processor::{NotificationKind, NOTIFICATIONS_PAGE_MAX};

impl Payments {
    /// Applies what the processor reported since the last notification applied, in
    /// order, a page at a time; the cursor moves past each one once it is applied, so
    /// a crash repeats at most the one in hand (and applying is idempotent). One that
    /// cannot be applied yet stops the page, to be tried again at the next tick.
    pub async fn apply_processor_notifications(&self) -> Result<usize> {
        let processor = self.vault.processor().clone();
        let name = processor.name();
        let after = self.store.processor_cursor(name).await?;
        let page = processor
            .notifications(after, NOTIFICATIONS_PAGE_MAX)
            .await
            .map_err(|e| Error::Unavailable(format!("the card processor's notifications: {e}")))?;
        let mut applied = 0;
        for n in page {
            match n.kind {
                NotificationKind::PayoutReturned => self.apply_payout_return(&n).await?,
                NotificationKind::DisputeOpened => self.apply_dispute_opened(&n).await?,
                NotificationKind::DisputeWon => self.apply_dispute_decided(&n, true).await?,
                NotificationKind::DisputeLost => self.apply_dispute_decided(&n, false).await?,
            }
            self.store.advance_processor_cursor(name, n.sequence).await?;
            applied += 1;
        }
        Ok(applied)
    }
}
