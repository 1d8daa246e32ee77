// Our sync protocol as js sees it (transports/libp2p.py, sync/messages.py, sync/proofs.py):
// one request per stream; a frame is a 4-byte big-endian length and a msgpack map with a
// `type` key; a handshake challenge is signed with Ed25519 over
// msgpack([`eidetica/handshake/v1`, challenge, signer's `ed25519:<base64>` key]).
import crypto from 'node:crypto'
import { decode, encode } from '@msgpack/msgpack'

export const HANDSHAKE_DOMAIN = 'eidetica/handshake/v1'
export const PROTOCOL_VERSION = 1
const MAX_FRAME = 16 * 1024 * 1024

export function frame (message) {
  const body = encode(message)
  const out = new Uint8Array(4 + body.length)
  new DataView(out.buffer).setUint32(0, body.length)
  out.set(body, 4)
  return out
}

/** Reads frames off a libp2p 3 stream (an async iterable of Uint8Array / Uint8ArrayList). */
export class FrameReader {
  constructor (stream) {
    this.chunks = stream[Symbol.asyncIterator]()
    this.buffer = new Uint8Array(0)
  }

  async fill (size) {
    while (this.buffer.length < size) {
      const { value, done } = await this.chunks.next()
      if (done) return false
      const chunk = value instanceof Uint8Array ? value : value.subarray()
      const joined = new Uint8Array(this.buffer.length + chunk.length)
      joined.set(this.buffer)
      joined.set(chunk, this.buffer.length)
      this.buffer = joined
    }
    return true
  }

  /** The next decoded message, or null at a clean end of stream. */
  async next () {
    if (!(await this.fill(4))) {
      if (this.buffer.length === 0) return null
      throw new Error(`stream ended inside a frame header (${this.buffer.length} bytes)`)
    }
    const size = new DataView(this.buffer.buffer, this.buffer.byteOffset).getUint32(0)
    if (size > MAX_FRAME) throw new Error(`frame of ${size} bytes is over ${MAX_FRAME}`)
    if (!(await this.fill(4 + size))) throw new Error('stream ended inside a frame')
    const body = this.buffer.subarray(4, 4 + size)
    this.buffer = this.buffer.slice(4 + size)
    return decode(body)
  }
}

export function deviceKey () {
  const { publicKey, privateKey } = crypto.generateKeyPairSync('ed25519')
  const raw = Buffer.from(publicKey.export({ format: 'jwk' }).x, 'base64url')
  return { privateKey, text: 'ed25519:' + raw.toString('base64') }
}

function publicKeyOf (text) {
  if (typeof text !== 'string' || !text.startsWith('ed25519:')) throw new Error(`not an ed25519 key: ${text}`)
  const raw = Buffer.from(text.slice('ed25519:'.length), 'base64')
  if (raw.length !== 32) throw new Error(`key is ${raw.length} bytes, not 32`)
  return crypto.createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: raw.toString('base64url') }, format: 'jwk' })
}

export function signChallenge (key, challenge) {
  return new Uint8Array(crypto.sign(null, encode([HANDSHAKE_DOMAIN, challenge, key.text]), key.privateKey))
}

export function checkChallenge (signer, challenge, signature) {
  return crypto.verify(null, encode([HANDSHAKE_DOMAIN, challenge, signer]), publicKeyOf(signer), signature)
}

/** One request on a fresh stream: write one frame, read answer frames to the end. */
export async function request (node, target, protocol, message, options = {}) {
  const stream = await node.dialProtocol(target, protocol, options)
  stream.send(frame(message))
  await stream.close()
  const reader = new FrameReader(stream)
  const answers = []
  for (let answer = await reader.next(); answer != null; answer = await reader.next()) answers.push(answer)
  return answers
}
