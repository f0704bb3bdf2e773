// The everyday flows against pgstore, each returning what it observed.
import { randomUUID } from 'crypto';
import type * as grpc from '@grpc/grpc-js';
import { call, errorInfo, type ErrorInfo, type EventStoreClient } from './pgstore';
import type { EventData } from './generated/pgstore/v1/EventData';
import type { AppendRequest } from './generated/pgstore/v1/AppendRequest';
import type { AppendResponse__Output } from './generated/pgstore/v1/AppendResponse';
import type { LoadResponse__Output } from './generated/pgstore/v1/LoadResponse';
import type { ReadFromResponse__Output } from './generated/pgstore/v1/ReadFromResponse';
import type { SubscribeResponse__Output } from './generated/pgstore/v1/SubscribeResponse';
import type { LoadCheckpointResponse__Output } from './generated/pgstore/v1/LoadCheckpointResponse';
import type { RecordedEvent__Output } from './generated/pgstore/v1/RecordedEvent';

export function event(eventType: string, payload: unknown, metadata: Record<string, string> = {}): EventData {
  return { eventType, json: JSON.stringify(payload), metadata };
}

export function append(client: EventStoreClient, request: AppendRequest): Promise<AppendResponse__Output> {
  return call(client, client.Append, request);
}

/** Create a stream (noStream), append at an exact version with an idempotency key, retry it. */
export async function appendWithConcurrency(client: EventStoreClient, stream: string) {
  const created = await append(client, {
    streamId: stream,
    noStream: true,
    events: [event('OrderPlaced', { total: 42 }, { correlation_id: 'c-1' })],
  });
  const key = `ship-${stream}`;
  const shipped = await append(client, {
    streamId: stream,
    exact: 1,
    idempotencyKey: key,
    events: [event('OrderShipped', { carrier: 'dhl' })],
  });
  // The client timed out and retries: same key, nothing written twice.
  const retried = await append(client, {
    streamId: stream,
    exact: 1,
    idempotencyKey: key,
    events: [event('OrderShipped', { carrier: 'dhl' })],
  });
  return { created, shipped, retried };
}

/** A stale expected version: the code and the ErrorInfo the server attaches. */
export async function conflict(client: EventStoreClient, stream: string): Promise<{ code: number; info?: ErrorInfo }> {
  try {
    await append(client, { streamId: stream, exact: 1, events: [event('OrderCancelled', {})] });
  } catch (e) {
    const err = e as grpc.ServiceError;
    return { code: err.code, info: errorInfo(err) };
  }
  throw new Error('the stale append was accepted');
}

/** Read a stream, fenced by the sequence an append returned (read-your-writes). */
export function load(client: EventStoreClient, stream: string, fence: string): Promise<LoadResponse__Output> {
  return call(client, client.Load, { streamId: stream, minSequence: fence });
}

/** Page through the global log under a prefix, two events a page. */
export async function readAllPages(client: EventStoreClient, prefix: string): Promise<string[]> {
  const seen: string[] = [];
  let from = '1';
  for (;;) {
    const page: ReadFromResponse__Output = await call(client, client.ReadFrom, {
      fromSequence: from,
      limit: 2,
      streamPrefix: prefix,
    });
    seen.push(...page.events.map((e) => e.globalSequence));
    from = page.nextSequence;
    // Past the head: done (an empty page below the head is not the end).
    if (BigInt(from) > BigInt(page.head)) return seen;
  }
}

/** The first `n` events of a subscription (then it is cancelled); assignments are passed on. */
export function firstEvents(
  client: EventStoreClient,
  request: Parameters<EventStoreClient['Subscribe']>[0],
  n: number,
  onAssignment?: (partitions: number[]) => void,
): Promise<RecordedEvent__Output[]> {
  return new Promise((resolve, reject) => {
    const got: RecordedEvent__Output[] = [];
    const stream = client.Subscribe(request);
    stream.on('data', (m: SubscribeResponse__Output) => {
      if (m.assignment) onAssignment?.(m.assignment.partitions);
      if (m.event && got.length < n) {
        got.push(m.event);
        if (got.length === n) {
          stream.cancel();
          resolve(got);
        }
      }
    });
    stream.on('error', (err: grpc.ServiceError) => {
      if (got.length < n) reject(err);
    });
  });
}

/** Process two events, checkpoint, leave; resume after the checkpoint. */
export async function subscribeWithCheckpoint(client: EventStoreClient, prefix: string) {
  const consumer = `ts-${randomUUID().slice(0, 8)}`;
  const first = await firstEvents(client, { consumerId: consumer, streamPrefix: prefix }, 2);
  const last = first[first.length - 1].globalSequence;
  await call(client, client.SaveCheckpoint, { consumerId: consumer, sequence: last });
  const saved: LoadCheckpointResponse__Output = await call(client, client.LoadCheckpoint, { consumerId: consumer });
  const [resumed] = await firstEvents(client, { consumerId: consumer, streamPrefix: prefix }, 1);
  return { first: first.map((e) => e.globalSequence), saved, resumed: resumed.globalSequence };
}

/** A consumer-group member: its partitions, an event of one, the checkpoint per partition. */
export async function groupMember(client: EventStoreClient, prefix: string) {
  const group = `billing-${randomUUID().slice(0, 8)}`;
  let owned: number[] = [];
  const [got] = await firstEvents(client, { group, member: 'worker-1', streamPrefix: prefix }, 1, (p) => {
    owned = p;
  });
  await call(client, client.SaveCheckpoint, { consumerId: `${group}/${got.partition}`, sequence: got.globalSequence });
  return { owned, event: got };
}

/**
 * A transfer: debit one account and credit another in one MultiStreamAppend, each at the version
 * the decision read; retried with its key; then a second transfer decided on the same (now stale)
 * versions, refused as a whole.
 */
export async function transfer(client: EventStoreClient, prefix: string) {
  const [from, to] = [`${prefix}account-a`, `${prefix}account-b`];
  await call(client, client.MultiStreamAppend, {
    parts: [
      { streamId: from, noStream: true, events: [event('Deposited', { amount: 10 })] },
      { streamId: to, noStream: true, events: [event('Opened', {})] },
    ],
  });
  const request = {
    idempotencyKey: `transfer-${prefix}1`,
    parts: [
      { streamId: from, exact: 1, events: [event('Debited', { amount: 4 })] },
      { streamId: to, exact: 1, events: [event('Credited', { amount: 4 })] },
    ],
  };
  const moved = await call(client, client.MultiStreamAppend, request);
  const retried = await call(client, client.MultiStreamAppend, request);
  let refused: { code: number; info?: ErrorInfo } | undefined;
  try {
    await call(client, client.MultiStreamAppend, { ...request, idempotencyKey: '' });
  } catch (e) {
    const err = e as grpc.ServiceError;
    refused = { code: err.code, info: errorInfo(err) };
  }
  return { from, moved, retried, refused };
}
