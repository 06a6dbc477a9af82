-- Payments (issue 11): an order's channel and provider payment, the provider's webhook events,
-- and every transition of an order, each kept once.
--
-- An order is recorded before the provider is asked; the provider's answer (at once, or later by
-- a signed webhook) moves it on. Each status an order reaches is one row of order_transitions,
-- keyed (order, status): two deliveries of an outcome cannot both make it. A transition that moves
-- coins (a credit, a claw-back, a reversal) says how many, and done_ms stays NULL until that
-- movement is made in Redis (a keyed Lua script): whatever dies between the SQL commit and the
-- Redis call, the transition is still to do, and the payments sweep (or the next start) makes it
-- once.
ALTER TABLE orders ADD COLUMN channel TEXT NOT NULL DEFAULT 'web';
ALTER TABLE orders ADD COLUMN payment_id TEXT;
ALTER TABLE orders ADD COLUMN decline_reason TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS orders_payment ON orders (payment_id);
-- GET /v1/recharges: a user's orders, newest first, by cursor.
CREATE INDEX IF NOT EXISTS orders_user_created ON orders (user_id, created_ms, id);

-- Every webhook event applied, keyed by the provider's event id: a redelivery is a duplicate.
-- outcome: applied (it made transitions) or ignored (the order was past it).
CREATE TABLE IF NOT EXISTS payment_events (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    type TEXT NOT NULL,
    payment_id TEXT NOT NULL,
    order_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    received_ms BIGINT NOT NULL,
    body TEXT NOT NULL
);

-- coins: the signed coin movement the transition makes (+ credit or reversal, - claw-back, 0 none).
-- event_id: the webhook event that made it (NULL: the recharge request or the expiry sweep).
CREATE TABLE IF NOT EXISTS order_transitions (
    order_id TEXT NOT NULL,
    status TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    event_id TEXT,
    coins BIGINT NOT NULL,
    done_ms BIGINT,
    PRIMARY KEY (order_id, status)
);
-- The sweep's question: transitions whose coin movement is still to make.
CREATE INDEX IF NOT EXISTS order_transitions_todo ON order_transitions (done_ms) WHERE done_ms IS NULL;
