// What every script here shares: a js-libp2p 3 node with the stack our node speaks
// (TCP, Noise, Yamux, identify, ping), argument parsing, one-line JSON output, and an
// exit when the test harness closes our stdin or sends SIGTERM.
import './polyfills.mjs'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { tcp } from '@libp2p/tcp'
import { createLibp2p } from 'libp2p'

export const SYNC_PROTOCOL = '/eidetica/sync/1.0.0'

/** `--name value` pairs (repeatable names collect into arrays when listed in `many`). */
export function parseArgs (argv, many = []) {
  const out = {}
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]
    if (!arg.startsWith('--')) throw new Error(`unexpected argument ${arg}`)
    const name = arg.slice(2)
    const value = argv[i + 1] != null && !argv[i + 1].startsWith('--') ? argv[++i] : true
    if (many.includes(name)) (out[name] ??= []).push(value)
    else out[name] = value
  }
  return out
}

export function emit (object) {
  process.stdout.write(JSON.stringify(object) + '\n')
}

export function log (...parts) {
  process.stderr.write(`[${new Date().toISOString()}] ${parts.join(' ')}\n`)
}

/** A node with our stack; `extra` adds transports and services. */
export async function createNode ({ listen = [], transports = [], services = {}, connectionManager = {} } = {}) {
  return createLibp2p({
    addresses: { listen },
    transports: [tcp(), ...transports],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    connectionManager,
    services: { identify: identify(), ping: ping(), ...services }
  })
}

/** Stop the node and exit when stdin closes (the harness died or is done) or on SIGTERM/SIGINT. */
export function stopOnHangup (node) {
  let stopping = false
  const stop = async (why) => {
    if (stopping) return
    stopping = true
    log('stopping:', why)
    try {
      await node.stop()
    } finally {
      process.exit(0)
    }
  }
  process.stdin.on('end', () => { stop('stdin closed') })
  process.stdin.on('close', () => { stop('stdin closed') })
  process.stdin.resume()
  process.on('SIGTERM', () => { stop('SIGTERM') })
  process.on('SIGINT', () => { stop('SIGINT') })
  return stop
}
