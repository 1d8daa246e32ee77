// A circuit relay v2 server with js-libp2p's DEFAULT limits (128 KiB of data and 2 minutes
// per circuit, 15 reservations): what public relays run. Usage:
//   node relay.mjs [--listen /ip4/127.0.0.1/tcp/0]
// Prints {"peer_id", "addrs"} as one JSON line once listening, then logs its connections to
// stderr. For reservations, circuits and their limits set DEBUG='libp2p:circuit-relay:server*'
// (js's own debug log; its relay emits no event for them). At a circuit's data limit js
// resets both legs; the duration limit is sent and enforced in milliseconds.
import './polyfills.mjs'
import { circuitRelayServer } from '@libp2p/circuit-relay-v2'
import { createNode, emit, log, parseArgs, stopOnHangup } from './common.mjs'

const args = parseArgs(process.argv.slice(2))
const node = await createNode({
  listen: [args.listen ?? '/ip4/127.0.0.1/tcp/0'],
  services: { relay: circuitRelayServer() }
})
node.addEventListener('connection:open', (event) => {
  const c = event.detail
  log('connection open', c.remotePeer.toString(), c.remoteAddr.toString())
})
node.addEventListener('connection:close', (event) => {
  const c = event.detail
  log('connection close', c.remotePeer.toString(), c.remoteAddr.toString())
})
stopOnHangup(node)
emit({ peer_id: node.peerId.toString(), addrs: node.getMultiaddrs().map((a) => a.toString()) })
