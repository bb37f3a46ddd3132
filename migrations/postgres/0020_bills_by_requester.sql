-- ListBills as the requester (issue 24): the requests a user made, newest first. As
-- the payer it reads payment_requests_payer.
CREATE INDEX payment_requests_requester ON payment_requests (requester_id, created_at_us);
