-- ListBills as the requester (issue 24); see the PostgreSQL migration of the same number.
CREATE INDEX payment_requests_requester ON payment_requests (requester_id, created_at_us);
