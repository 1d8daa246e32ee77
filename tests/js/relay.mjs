// A circuit relay v2 server with js-libp2p's DEFAULT limits (128 KiB of data and 2 minutes
// per circuit, 15 reservations): what public relays run. Usage:
//   node relay.mjs [--listen /ip4/127.0.0.1/tcp/0]
// Prints {"peer_id", "addrs"} as one JSON line once listening, then logs reservations and
// circuits to stderr (what a test reads to see how js ends a circuit at its limit).
import './polyfills.mjs'
import { circuitRelayServer } from '@libp2p/circuit-relay-v2'
import { createNode, emit, log, parseArgs, stopOnHangup } from './common.mjs'

const args = parseArgs(process.argv.slice(2))
const node = await createNode({
  listen: [args.listen ?? '/ip4/127.0.0.1/tcp/0'],
  services: { relay: circuitRelayServer() }
})
node.services.relay.addEventListener('relay:reservation', (event) => {
  log('reservation', event.detail.relay?.toString?.() ?? JSON.stringify(event.detail, (_, v) => typeof v === 'bigint' ? v.toString() : v))
})
node.services.relay.addEventListener('relay:advert:error', (event) => { log('advert error', event.detail) })
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
