// A js-libp2p peer that dials our node and checks what a stranger's stack sees: identify
// (agent and protocols), ping, and our sync Handshake (the reply's challenge signature
// must verify against the device key it names), then HandshakeConfirm (answered Ack).
// Usage: node peer.mjs --dial /ip4/.../tcp/.../p2p/<peer id> [--limited]
// Prints one JSON line: {"ok": bool, "checks": {...}, "failures": [...]}; exits 0 if ok.
import './polyfills.mjs'
import crypto from 'node:crypto'
import { circuitRelayTransport } from '@libp2p/circuit-relay-v2'
import { multiaddr } from '@multiformats/multiaddr'
import { SYNC_PROTOCOL, createNode, emit, parseArgs } from './common.mjs'
import { PROTOCOL_VERSION, checkChallenge, deviceKey, request, signChallenge } from './frames.mjs'

const args = parseArgs(process.argv.slice(2))
if (typeof args.dial !== 'string') throw new Error('--dial MULTIADDR is required')
const target = multiaddr(args.dial)
const options = { runOnLimitedConnection: args.limited === true, signal: AbortSignal.timeout(30_000) }
const checks = {}
const failures = []
const expect = (name, ok, detail) => { if (!ok) failures.push(`${name}: ${detail}`) }

const node = await createNode({ transports: [circuitRelayTransport()] })
try {
  // js runs identify by itself on every new connection (one outbound identify stream per
  // connection at a time): wait for that result rather than racing it with a second one.
  const identified = new Promise((resolve) => {
    node.addEventListener('peer:identify', (event) => { resolve(event.detail) })
  })
  await node.dial(target, options)
  const id = await Promise.race([
    identified,
    new Promise((resolve, reject) => setTimeout(() => reject(new Error('no identify result in 15 s')), 15_000))
  ])
  checks.agent = id.agentVersion
  checks.protocols = id.protocols
  checks.observed = id.observedAddr?.toString() ?? null
  checks.listen = (id.listenAddrs ?? []).map((a) => a.toString())
  expect('identify', id.protocols.includes(SYNC_PROTOCOL), `no ${SYNC_PROTOCOL} in ${id.protocols}`)
  checks.ping_ms = await node.services.ping.ping(target, options)

  const key = deviceKey()
  const challenge = new Uint8Array(crypto.randomBytes(32))
  const hello = { type: 'Handshake', device_key: key.text, display_name: 'js-peer', version: PROTOCOL_VERSION, challenge, addresses: [] }
  const [reply, ...rest] = await request(node, target, SYNC_PROTOCOL, hello, options)
  checks.reply_type = reply?.type
  expect('handshake', reply?.type === 'HandshakeReply' && rest.length === 0, `answered ${JSON.stringify(reply?.type)} (+${rest.length} frames)`)
  if (reply?.type === 'HandshakeReply') {
    checks.device_key = reply.device_key
    checks.version = reply.version
    checks.signature_valid = checkChallenge(reply.device_key, challenge, reply.challenge_signature)
    checks.forged_rejected = !checkChallenge(reply.device_key, crypto.randomBytes(32), reply.challenge_signature)
    expect('signature', checks.signature_valid, 'the challenge signature does not verify')
    expect('forgery', checks.forged_rejected, 'a signature over another challenge verified (the check is broken)')
    const confirm = { type: 'HandshakeConfirm', device_key: key.text, counter_challenge: reply.counter_challenge, signature: signChallenge(key, reply.counter_challenge) }
    const [ack] = await request(node, target, SYNC_PROTOCOL, confirm, options)
    checks.confirm_answer = ack?.type
    expect('confirm', ack?.type === 'Ack', `HandshakeConfirm answered ${JSON.stringify(ack)}`)
  }
  const [bad] = await request(node, target, SYNC_PROTOCOL, { type: 'NoSuchMessage' }, options)
  checks.unknown_answer = bad?.type === 'Error' ? bad.code : JSON.stringify(bad)
  expect('unknown message', bad?.type === 'Error', `answered ${JSON.stringify(bad)}`)
} catch (err) {
  failures.push(`${err.name}: ${err.message}`)
} finally {
  emit({ ok: failures.length === 0, checks, failures })
  await node.stop()
}
process.exit(failures.length === 0 ? 0 : 1)
