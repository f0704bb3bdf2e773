// Runs the flows against a live pgstore: EVENT_STORE_ADDR (default localhost:50051), and
// EVENT_STORE_TOKEN when the server requires tokens.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'crypto';
import { status } from '@grpc/grpc-js';
import { connect } from '../src/pgstore';
import * as flows from '../src/flows';

const client = connect(process.env.EVENT_STORE_ADDR ?? 'localhost:50051', process.env.EVENT_STORE_TOKEN);
const prefix = `ts-${randomUUID().slice(0, 8)}-`;
const order = `${prefix}order-1`;
let fence = '0';

test('append with optimistic concurrency and an idempotency key', async () => {
  const { created, shipped, retried } = await flows.appendWithConcurrency(client, order);
  assert.equal(created.version, '1');
  assert.equal(shipped.version, '2');
  assert.equal(shipped.duplicate, false);
  assert.equal(retried.duplicate, true);
  assert.equal(retried.lastSequence, shipped.lastSequence);
  fence = shipped.lastSequence;
  await flows.append(client, { streamId: `${prefix}order-2`, events: [flows.event('OrderPlaced', { total: 7 })] });
});

test('a conflict carries google.rpc.ErrorInfo', async () => {
  const { code, info } = await flows.conflict(client, order);
  assert.equal(code, status.ABORTED);
  assert.equal(info?.reason, 'WRONG_EXPECTED_VERSION');
  assert.equal(info?.domain, 'pgstore.v1');
  assert.equal(info?.metadata.actual_version, '2');
});

test('load a stream, reading our own writes', async () => {
  const page = await flows.load(client, order, fence);
  assert.deepEqual(page.events.map((e) => e.eventType), ['OrderPlaced', 'OrderShipped']);
  assert.deepEqual(JSON.parse(page.events[0].json ?? 'null'), { total: 42 });
  assert.equal(page.events[0].metadata.correlation_id, 'c-1');
});

test('page through the global log', async () => {
  const seen = (await flows.readAllPages(client, prefix)).map(Number);
  assert.equal(seen.length, 3);
  assert.deepEqual(seen, [...seen].sort((a, b) => a - b));
});

test('subscribe, checkpoint, resume after the checkpoint', async () => {
  const { first, saved, resumed } = await flows.subscribeWithCheckpoint(client, prefix);
  assert.equal(first.length, 2);
  assert.equal(saved.found, true);
  assert.equal(saved.sequence, first[1]);
  assert.ok(Number(resumed) > Number(first[1]));
});

test('a consumer-group member gets partitions and their events', async () => {
  const { owned, event } = await flows.groupMember(client, prefix);
  assert.ok(owned.length > 0);
  assert.ok(owned.includes(event.partition));
});

test.after(() => client.close());

test('a transfer writes both accounts or neither', async () => {
  const { from, moved, retried, refused } = await flows.transfer(client, `ts-${randomUUID().slice(0, 8)}-`);
  assert.deepEqual(moved.parts.map((p) => p.version), ['2', '2']);
  assert.equal(BigInt(moved.lastSequence), BigInt(moved.firstSequence) + 1n);
  assert.equal(retried.duplicate, true);
  assert.deepEqual(retried.parts, moved.parts);
  assert.equal(refused?.code, status.FAILED_PRECONDITION);
  assert.equal(refused?.info?.reason, 'WRONG_EXPECTED_VERSION');
  assert.equal(refused?.info?.metadata.stream_id, from);
});
