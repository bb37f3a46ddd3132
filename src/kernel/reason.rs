//! The catalogue of machine-readable reasons: every `google.rpc.ErrorInfo.reason` dmpay
//! answers with (domain `dmpay.v1`), and every `failure_reason` a failed payment keeps.
//! Nothing else spells a reason. The same list, with what each means, is in the comment
//! of `proto/dmpay/v1/common.proto`, and a test keeps the two the same.

crate::stored_enum! {
    /// Why a call was refused (with `FAILED_PRECONDITION` or `RESOURCE_EXHAUSTED`), or
    /// why a payment failed.
    pub enum Reason {
        /// The caller's own account is frozen.
        AccountFrozen = "ACCOUNT_FROZEN",
        /// The ledger entry was reversed before.
        AlreadyReversed = "ALREADY_REVERSED",
        /// A balance would exceed what the ledger can hold.
        BalanceLimit = "BALANCE_LIMIT",
        /// The issuer declined the card.
        CardDeclined = "CARD_DECLINED",
        /// The card has expired.
        CardExpired = "CARD_EXPIRED",
        /// The card's CVC is no longer held (it is kept in memory only, for minutes).
        CvcUnavailable = "CVC_UNAVAILABLE",
        /// Over the tier's rolling 24-hour limit.
        DailyLimit = "DAILY_LIMIT",
        /// The pending entry passed its timeout.
        EntryExpired = "ENTRY_EXPIRED",
        /// The entry is no longer pending.
        EntryNotPending = "ENTRY_NOT_PENDING",
        /// Only a posted entry can be reversed.
        EntryNotPosted = "ENTRY_NOT_POSTED",
        /// The entry belongs to a module (payments, reconciliation); change it there.
        EntryOwnedByModule = "ENTRY_OWNED_BY_MODULE",
        /// The processor blocked the charge as suspected fraud.
        FraudSuspected = "FRAUD_SUSPECTED",
        /// Money that arrived from card-funded payments recently cannot be cashed out
        /// instantly yet (`DMPAY_PAYOUT_INSTANT_HOLD`); a standard payout can.
        FundsOnHold = "FUNDS_ON_HOLD",
        /// The card's security code is incorrect.
        IncorrectCvc = "INCORRECT_CVC",
        /// The card cannot receive instant payouts (a credit card); a standard payout can.
        InstantPayoutUnavailable = "INSTANT_PAYOUT_UNAVAILABLE",
        /// The wallet (or the card) cannot cover the amount.
        InsufficientFunds = "INSUFFICIENT_FUNDS",
        /// A matched reconciliation item needs no resolution.
        ItemMatched = "ITEM_MATCHED",
        /// The reconciliation item is resolved already.
        ItemResolved = "ITEM_RESOLVED",
        /// A later report of the same day superseded the item's run.
        ItemSuperseded = "ITEM_SUPERSEDED",
        /// The posting engine's queue is full; retry with the same key.
        LedgerQueueFull = "LEDGER_QUEUE_FULL",
        /// The listing is closed, or past its end time.
        ListingClosed = "LISTING_CLOSED",
        /// The listing's sale has not started yet.
        ListingNotStarted = "LISTING_NOT_STARTED",
        /// The card was reported lost.
        LostCard = "LOST_CARD",
        /// The account is not a seller (the platform sets sellers through `Accounts.SetSeller`).
        NotASeller = "NOT_A_SELLER",
        /// No card to charge: none given and no default.
        NoPaymentMethod = "NO_PAYMENT_METHOD",
        /// The seller has as many open listings as allowed; close one first.
        OpenListings = "OPEN_LISTINGS",
        /// A seller cannot buy from their own listing.
        OwnListing = "OWN_LISTING",
        /// A payment failed for a reason this build does not know (a stored reason
        /// written by a newer one).
        PaymentFailed = "PAYMENT_FAILED",
        /// Over the tier's per-payment limit.
        PaymentLimit = "PAYMENT_LIMIT",
        /// The user has as many active cards as allowed.
        PaymentMethodLimit = "PAYMENT_METHOD_LIMIT",
        /// The card is not active (not linked yet, or expired).
        PaymentMethodNotActive = "PAYMENT_METHOD_NOT_ACTIVE",
        /// The card was removed.
        PaymentMethodRemoved = "PAYMENT_METHOD_REMOVED",
        /// The payment is not settled, so it cannot be refunded.
        PaymentNotRefundable = "PAYMENT_NOT_REFUNDABLE",
        /// Over the tier's rolling 24-hour payout limit.
        PayoutDailyLimit = "PAYOUT_DAILY_LIMIT",
        /// Over the tier's per-payout limit.
        PayoutLimit = "PAYOUT_LIMIT",
        /// Over the listing's per-buyer maximum.
        PerBuyerLimit = "PER_BUYER_LIMIT",
        /// The card processor could not process the charge.
        ProcessingError = "PROCESSING_ERROR",
        /// Over the caller's write rate; `RetryInfo` says when to retry.
        RateLimited = "RATE_LIMITED",
        /// The caller owes the platform for a disputed payment their wallet could not
        /// cover; incoming money repays it first, and until then they cannot send or
        /// cash out.
        ReceivableOutstanding = "RECEIVABLE_OUTSTANDING",
        /// The recipient (or payer) cannot take part in payments now.
        RecipientUnavailable = "RECIPIENT_UNAVAILABLE",
        /// The processor day has as many reconciliation runs as allowed.
        ReconRunsPerDay = "RECON_RUNS_PER_DAY",
        /// More than what is left to refund.
        RefundExceedsPayment = "REFUND_EXCEEDS_PAYMENT",
        /// The bill passed its expiry.
        RequestExpired = "REQUEST_EXPIRED",
        /// The bill is paid, declined, cancelled or expired.
        RequestNotOpen = "REQUEST_NOT_OPEN",
        /// A payment of the bill is being charged; it cannot close meanwhile.
        RequestPaymentInProgress = "REQUEST_PAYMENT_IN_PROGRESS",
        /// The listing has no units left for this purchase.
        SoldOut = "SOLD_OUT",
        /// The statement's period has too many movements; ask for a shorter one.
        StatementTooLong = "STATEMENT_TOO_LONG",
        /// The listing has had as many stock additions as allowed; create a new listing.
        StockAdds = "STOCK_ADDS",
        /// The card was reported stolen.
        StolenCard = "STOLEN_CARD",
        /// The purchase is more than what is left of the tab's cap.
        TabCap = "TAB_CAP",
        /// The tab is not open (still authorizing, closing or closed).
        TabNotOpen = "TAB_NOT_OPEN",
        /// Over the caller's card tokenizations per hour.
        TokenizeRateLimit = "TOKENIZE_RATE_LIMIT",
        /// The server has as many watch streams open as allowed.
        Watchers = "WATCHERS",
        /// The caller has as many watch streams open as allowed.
        WatchersPerUser = "WATCHERS_PER_USER",
    }
}

#[cfg(test)]
mod tests {
    use super::Reason;

    /// The proto's comment lists every reason, so a client's developer finds the whole
    /// catalogue in the API, and nothing in it that dmpay never sends.
    #[test]
    fn the_proto_documents_every_reason_and_no_other() {
        let proto = include_str!("../../proto/dmpay/v1/common.proto");
        let listed: Vec<&str> =
            proto.lines().filter_map(|l| l.trim().strip_prefix("// - ")).filter_map(|l| l.split(':').next()).collect();
        let ours: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(listed, ours, "common.proto's reason list, in the order of kernel::reason");
    }
}
