// ES2024 built-ins that libp2p 3 uses and Node 20 lacks (libp2p 3 declares Node >= 22).
// Imported first by every script, before libp2p loads. Each one is defined only when
// missing, so on Node 22+ this module does nothing.

if (typeof Promise.withResolvers !== 'function') {
  Object.defineProperty(Promise, 'withResolvers', {
    configurable: true,
    writable: true,
    value: function withResolvers () {
      let resolve
      let reject
      const promise = new this((res, rej) => { resolve = res; reject = rej })
      return { promise, resolve, reject }
    }
  })
}

if (typeof Object.groupBy !== 'function') {
  Object.defineProperty(Object, 'groupBy', {
    configurable: true,
    writable: true,
    value: function groupBy (items, key) {
      const out = Object.create(null)
      let i = 0
      for (const item of items) {
        const k = key(item, i++)
        ;(out[k] ??= []).push(item)
      }
      return out
    }
  })
}

if (typeof Map.groupBy !== 'function') {
  Object.defineProperty(Map, 'groupBy', {
    configurable: true,
    writable: true,
    value: function groupBy (items, key) {
      const out = new Map()
      let i = 0
      for (const item of items) {
        const k = key(item, i++)
        if (!out.has(k)) out.set(k, [])
        out.get(k).push(item)
      }
      return out
    }
  })
}

if (typeof Array.fromAsync !== 'function') {
  Object.defineProperty(Array, 'fromAsync', {
    configurable: true,
    writable: true,
    value: async function fromAsync (items, map) {
      const out = []
      let i = 0
      for await (const item of items) out.push(map == null ? item : await map(item, i++))
      return out
    }
  })
}
