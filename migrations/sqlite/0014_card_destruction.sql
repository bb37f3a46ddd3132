-- A removed card's number is destroyed once DMPAY_VAULT_REMOVED_RETENTION has passed: its
-- wrapped data key and ciphertext are emptied (without the key the number can never be
-- read again, whatever backups of the ciphertext exist), and the token row stays for
-- history with brand, last four and expiry.
ALTER TABLE payment_methods ADD COLUMN destroyed_at_us INTEGER;
CREATE INDEX payment_methods_to_destroy ON payment_methods (removed_at_us)
    WHERE status = 'removed' AND destroyed_at_us IS NULL;
