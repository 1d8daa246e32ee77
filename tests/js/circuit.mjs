// js peers meeting through a circuit relay (ours, in the tests). Two roles:
//   node circuit.mjs listen --relay RELAY_MULTIADDR
//     reserves a slot on the relay, serves an echo protocol on relayed connections too,
//     prints {"peer_id", "addrs", "circuit"} once the circuit address is ours, then runs
//     until stdin closes or SIGTERM.
//   node circuit.mjs dial --target CIRCUIT_MULTIADDR [--bytes N]
//     opens the echo protocol through the relay, sends N random bytes (default 256 KiB,
//     twice js's own default circuit data limit), checks they come back, prints
//     {"ok", "bytes", "ms", "remote_addr", "limited"}.
import './polyfills.mjs'
import crypto from 'node:crypto'
import { circuitRelayTransport } from '@libp2p/circuit-relay-v2'
import { multiaddr } from '@multiformats/multiaddr'
import { createNode, emit, log, parseArgs, stopOnHangup } from './common.mjs'

const ECHO = '/eidetica-test/echo/1.0.0'
const [role, ...rest] = process.argv.slice(2)
const args = parseArgs(rest)

async function listen () {
  if (typeof args.relay !== 'string') throw new Error('--relay MULTIADDR is required')
  const node = await createNode({
    listen: [`${args.relay}/p2p-circuit`],
    transports: [circuitRelayTransport()]
  })
  await node.handle(ECHO, async (stream) => {
    for await (const chunk of stream) {
      if (!stream.send(chunk)) await stream.onDrain()
    }
    await stream.close()
  }, { runOnLimitedConnection: true })
  stopOnHangup(node)
  const deadline = Date.now() + 30_000
  let circuit = []
  while (circuit.length === 0 && Date.now() < deadline) {
    circuit = node.getMultiaddrs().map(String).filter((a) => a.includes('/p2p-circuit'))
    if (circuit.length === 0) await new Promise((resolve) => setTimeout(resolve, 100))
  }
  if (circuit.length === 0) {
    emit({ ok: false, error: 'no circuit address within 30 s', addrs: node.getMultiaddrs().map(String) })
    await node.stop()
    process.exit(1)
  }
  node.addEventListener('connection:open', (event) => { log('connection open', event.detail.remoteAddr.toString(), 'limited', event.detail.limits != null) })
  emit({ ok: true, peer_id: node.peerId.toString(), addrs: node.getMultiaddrs().map(String), circuit: circuit[0] })
}

async function dial () {
  if (typeof args.target !== 'string') throw new Error('--target MULTIADDR is required')
  const size = Number(args.bytes ?? 256 * 1024)
  const node = await createNode({ transports: [circuitRelayTransport()] })
  const result = { ok: false, bytes: size }
  try {
    const started = performance.now()
    const stream = await node.dialProtocol(multiaddr(args.target), ECHO, { runOnLimitedConnection: true, signal: AbortSignal.timeout(30_000) })
    const connection = node.getConnections().find((c) => c.streams.includes(stream)) ?? node.getConnections()[0]
    result.remote_addr = connection?.remoteAddr.toString()
    result.limited = connection?.limits != null
    const sent = new Uint8Array(crypto.randomBytes(size))
    const writing = (async () => {
      for (let offset = 0; offset < size; offset += 16384) {
        if (!stream.send(sent.subarray(offset, offset + 16384))) await stream.onDrain()
      }
      await stream.close()
    })()
    const received = new Uint8Array(size)
    let got = 0
    for await (const chunk of stream) {
      const bytes = chunk instanceof Uint8Array ? chunk : chunk.subarray()
      if (got + bytes.length > size) throw new Error('echo sent back more than was sent')
      received.set(bytes, got)
      got += bytes.length
    }
    await writing
    result.received = got
    result.ms = Math.round(performance.now() - started)
    result.ok = got === size && Buffer.compare(Buffer.from(sent), Buffer.from(received)) === 0
    if (!result.ok) result.error = `echo returned ${got} of ${size} bytes${got === size ? ', altered' : ''}`
  } catch (err) {
    result.error = `${err.name}: ${err.message}`
  } finally {
    emit(result)
    await node.stop()
  }
  process.exit(result.ok ? 0 : 1)
}

if (role === 'listen') await listen()
else if (role === 'dial') await dial()
else throw new Error('usage: circuit.mjs listen --relay ADDR | dial --target ADDR [--bytes N]')
