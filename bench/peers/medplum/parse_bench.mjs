// Bare-parse peer for bench/bench_mappings.py: Medplum's Hl7Message.parse (@medplum/core) over
// the same messages, for a time budget. Reads {"messages": [...], "budget": s} as JSON on
// stdin, prints {"msg_per_s": N, "rejects": K} on stdout.
import { Hl7Message } from '@medplum/core';

let input = '';
for await (const chunk of process.stdin) input += chunk;
const { messages, budget } = JSON.parse(input);

const ok = [];
let rejects = 0;
for (const text of messages) {
  try {
    Hl7Message.parse(text);
    ok.push(text);
  } catch {
    rejects += 1;
  }
}
let loops = 0;
const start = process.hrtime.bigint();
let elapsed = 0;
while (ok.length && elapsed < budget) {
  for (const text of ok) Hl7Message.parse(text);
  loops += 1;
  elapsed = Number(process.hrtime.bigint() - start) / 1e9;
}
const rate = ok.length && elapsed > 0 ? (loops * ok.length) / elapsed : null;
process.stdout.write(JSON.stringify({ msg_per_s: rate, rejects }) + '\n');
