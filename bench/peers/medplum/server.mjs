// Reference peer for bench/bench_intake.py: Medplum's Node Hl7Server (@medplum/hl7),
// answering every message with message.buildAck() and storing nothing.
//
//   node server.mjs [PORT]        (or PORT from $PEER_PORT; 0 = any free port)
//
// Prints one line "listening 127.0.0.1:<port>" once it accepts connections; stops on
// SIGTERM/SIGINT.
import net from 'node:net';
import { Hl7Server } from '@medplum/hl7';

const HOST = '127.0.0.1';
const port = Number.parseInt(process.argv[2] ?? process.env.PEER_PORT ?? '0', 10);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`bad port ${process.argv[2] ?? process.env.PEER_PORT}: give 0..65535`);
  process.exit(2);
}

const server = new Hl7Server((connection) => {
  connection.addEventListener('message', ({ message }) => {
    connection.send(message.buildAck());
  });
  // A client that drops mid-stream is normal at the end of a bench run; not worth a crash.
  connection.addEventListener('error', () => {});
});

// Hl7Server.start(port) calls net.Server#listen(port), which binds every interface. The bench
// stays on loopback, so bind that one call to 127.0.0.1 and restore listen() straight after.
const originalListen = net.Server.prototype.listen;
net.Server.prototype.listen = function listenOnLoopback(p) {
  return originalListen.call(this, { port: p, host: HOST });
};
try {
  server.start(port);
} finally {
  net.Server.prototype.listen = originalListen;
}

server.server.once('listening', () => {
  console.log(`listening ${HOST}:${server.server.address().port}`);
});
server.server.on('error', (err) => {
  console.error(`medplum peer: ${err.message}`);
  process.exit(1);
});

const stop = () => {
  server.stop({ forceDrainTimeoutMs: 0 }).finally(() => process.exit(0));
  // Belt and braces: never outlive the bench by more than a second.
  setTimeout(() => process.exit(0), 1000).unref();
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
