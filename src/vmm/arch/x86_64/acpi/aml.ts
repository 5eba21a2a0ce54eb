/**
 * A small ACPI Machine Language (AML) encoder for the DSDT (ACPI 6.5 §20).
 *
 * Every function returns the encoded bytes of one AML term, so terms compose by
 * nesting calls: `scope("\\_SB_", [device("COM1", [name("_HID", eisaId("PNP0501"))])])`.
 * Only what a VMM's DSDT needs is here (named objects, packages, buffers, integers,
 * strings, scopes, devices, methods with a small statement vocabulary: Return, If,
 * LEqual, Notify, ArgN; and the resource descriptors for legacy devices, a PCI
 * host bridge and a Generic Event Device's interrupt); anything malformed (bad
 * name segment, value out of range) throws `AML_ENCODING` rather than emitting AML
 * the guest's interpreter would reject.
 */
import { TypevisorError } from "../../../../errors.js";

/** ACPI 6.5 §20.3 opcodes used here. */
const OP = {
  Zero: 0x00,
  One: 0x01,
  Name: 0x08,
  BytePrefix: 0x0a,
  WordPrefix: 0x0b,
  DWordPrefix: 0x0c,
  StringPrefix: 0x0d,
  QWordPrefix: 0x0e,
  Scope: 0x10,
  Buffer: 0x11,
  Package: 0x12,
  Method: 0x14,
  /** Arg0..Arg6 are 0x68..0x6E (ACPI 6.5 §20.2.6.1). */
  Arg0: 0x68,
  DualNamePrefix: 0x2e,
  MultiNamePrefix: 0x2f,
  ExtOpPrefix: 0x5b,
  /** After ExtOpPrefix. */
  Device: 0x82,
  RootChar: 0x5c,
  ParentPrefixChar: 0x5e,
  Notify: 0x86,
  LEqual: 0x93,
  If: 0xa0,
  Return: 0xa4,
  Ones: 0xff,
} as const;

function amlError(message: string): TypevisorError {
  return new TypevisorError("AML_ENCODING", message);
}

/** Concatenate byte arrays. */
export function concat(parts: readonly Uint8Array[]): Uint8Array {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

/**
 * NameSeg (ACPI 6.5 §20.2.2): 4 characters, LeadNameChar = 'A'-'Z' | '_', then
 * 'A'-'Z' | '0'-'9' | '_'. Shorter names are padded with '_' as ASL does.
 */
export function nameSeg(seg: string): Uint8Array {
  if (!/^[A-Z_][A-Z0-9_]{0,3}$/.test(seg)) throw amlError(`invalid AML name segment "${seg}"`);
  const padded = seg.padEnd(4, "_");
  return Uint8Array.from(padded, (c) => c.charCodeAt(0));
}

/**
 * NameString (ACPI 6.5 §20.2.2): optional root '\' or parent '^' prefixes, then
 * one segment, two (DualNamePrefix) or more (MultiNamePrefix), e.g. "\\_SB_.PCI0".
 */
export function nameString(path: string): Uint8Array {
  let i = 0;
  const prefix: number[] = [];
  if (path.startsWith("\\")) {
    prefix.push(OP.RootChar);
    i = 1;
  } else {
    while (path[i] === "^") {
      prefix.push(OP.ParentPrefixChar);
      i++;
    }
  }
  const rest = path.slice(i);
  const segs = rest === "" ? [] : rest.split(".");
  const encoded = segs.map(nameSeg);
  let body: Uint8Array;
  if (encoded.length === 0) {
    // NullName: only meaningful after a root or parent prefix ("\").
    if (prefix.length === 0) throw amlError("empty AML name");
    body = Uint8Array.of(0x00);
  } else if (encoded.length === 1) {
    body = encoded[0]!;
  } else if (encoded.length === 2) {
    body = concat([Uint8Array.of(OP.DualNamePrefix), ...encoded]);
  } else {
    if (encoded.length > 255) throw amlError("AML name has too many segments");
    body = concat([Uint8Array.of(OP.MultiNamePrefix, encoded.length), ...encoded]);
  }
  return concat([Uint8Array.from(prefix), body]);
}

/**
 * PkgLength (ACPI 6.5 §20.2.4) for a body of `bodyLength` bytes. The encoded
 * length counts the PkgLength bytes themselves. One byte holds up to 63; with
 * 1-3 following bytes the lead byte keeps 4 bits and each follower 8 more.
 */
export function pkgLength(bodyLength: number): Uint8Array {
  if (!Number.isSafeInteger(bodyLength) || bodyLength < 0) throw amlError(`invalid AML package length ${bodyLength}`);
  if (bodyLength + 1 <= 0x3f) return Uint8Array.of(bodyLength + 1);
  for (let extra = 1; extra <= 3; extra++) {
    const total = bodyLength + 1 + extra;
    if (total < 2 ** (4 + 8 * extra)) {
      const out = new Uint8Array(1 + extra);
      out[0] = (extra << 6) | (total & 0x0f);
      for (let b = 0; b < extra; b++) out[1 + b] = Math.floor(total / 2 ** (4 + 8 * b)) & 0xff;
      return out;
    }
  }
  throw amlError(`AML package of ${bodyLength} bytes exceeds the 2^28 PkgLength limit`);
}

const MAX_U64 = 0xffff_ffff_ffff_ffffn;

/**
 * ComputationalData integer (ACPI 6.5 §20.2.3) in the shortest encoding:
 * ZeroOp, OneOp, OnesOp (all bits set, 64-bit), or Byte/Word/DWord/QWord prefix.
 */
export function integer(value: number | bigint): Uint8Array {
  const v = typeof value === "bigint" ? value : BigInt(value);
  if (typeof value === "number" && !Number.isSafeInteger(value)) throw amlError(`AML integer ${value} is not a safe integer`);
  if (v < 0n || v > MAX_U64) throw amlError(`AML integer ${v} is outside 0..2^64-1`);
  if (v === 0n) return Uint8Array.of(OP.Zero);
  if (v === 1n) return Uint8Array.of(OP.One);
  if (v === MAX_U64) return Uint8Array.of(OP.Ones);
  const le = (prefix: number, bytes: number): Uint8Array => {
    const out = new Uint8Array(1 + bytes);
    out[0] = prefix;
    for (let b = 0; b < bytes; b++) out[1 + b] = Number((v >> BigInt(8 * b)) & 0xffn);
    return out;
  };
  if (v <= 0xffn) return le(OP.BytePrefix, 1);
  if (v <= 0xffffn) return le(OP.WordPrefix, 2);
  if (v <= 0xffff_ffffn) return le(OP.DWordPrefix, 4);
  return le(OP.QWordPrefix, 8);
}

/** OnesOp: the all-bits-set integer (ACPI 6.5 §20.2.3). */
export function ones(): Uint8Array {
  return Uint8Array.of(OP.Ones);
}

/** String (ACPI 6.5 §20.2.3): StringPrefix, ASCII 0x01-0x7F, NUL. */
export function string(s: string): Uint8Array {
  const out = new Uint8Array(s.length + 2);
  out[0] = OP.StringPrefix;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x01 || c > 0x7f) throw amlError("AML strings must be ASCII without NUL");
    out[1 + i] = c;
  }
  return out;
}

/**
 * EISA ID as used by ASL's EISAID() for _HID/_CID (ACPI 6.5 §6.1.5): three
 * letters packed 5 bits each, then four hex digits, stored as a DWord whose bytes
 * read in order: e.g. "PNP0A03" -> 0x030AD041.
 */
export function eisaId(id: string): Uint8Array {
  if (!/^[A-Z]{3}[0-9A-F]{4}$/.test(id)) throw amlError(`invalid EISA ID "${id}"`);
  const c = (i: number): number => id.charCodeAt(i) - 0x40;
  const hex = (i: number): number => parseInt(id.slice(i, i + 2), 16);
  const b0 = (c(0) << 2) | (c(1) >> 3);
  const b1 = ((c(1) & 0x7) << 5) | c(2);
  const value = (b0 | (b1 << 8) | (hex(3) << 16) | (hex(5) << 24)) >>> 0;
  return integer(value);
}

/** DefName (ACPI 6.5 §20.2.5.1): `Name(path, value)`. */
export function name(path: string, value: Uint8Array): Uint8Array {
  return concat([Uint8Array.of(OP.Name), nameString(path), value]);
}

/** DefPackage (ACPI 6.5 §20.2.5.4): up to 255 already-encoded elements. */
export function pkg(elements: readonly Uint8Array[]): Uint8Array {
  if (elements.length > 255) throw amlError("AML Package holds at most 255 elements (VarPackage not implemented)");
  const body = concat([Uint8Array.of(elements.length), ...elements]);
  return concat([Uint8Array.of(OP.Package), pkgLength(body.length), body]);
}

/** DefBuffer (ACPI 6.5 §20.2.5.4): BufferSize then the bytes. */
export function buffer(bytes: Uint8Array): Uint8Array {
  const body = concat([integer(bytes.length), bytes]);
  return concat([Uint8Array.of(OP.Buffer), pkgLength(body.length), body]);
}

/** DefScope (ACPI 6.5 §20.2.5.1). */
export function scope(path: string, terms: readonly Uint8Array[]): Uint8Array {
  const body = concat([nameString(path), ...terms]);
  return concat([Uint8Array.of(OP.Scope), pkgLength(body.length), body]);
}

/** DefDevice (ACPI 6.5 §20.2.5.2): ExtOpPrefix DeviceOp PkgLength NameString TermList. */
export function device(path: string, terms: readonly Uint8Array[]): Uint8Array {
  const body = concat([nameString(path), ...terms]);
  return concat([Uint8Array.of(OP.ExtOpPrefix, OP.Device), pkgLength(body.length), body]);
}

export interface MethodOptions {
  /** ArgCount, 0-7 (MethodFlags bits 0-2). */
  args?: number;
  /** SerializeFlag (MethodFlags bit 3). */
  serialized?: boolean;
}

/**
 * DefMethod (ACPI 6.5 §20.2.5.2): MethodOp PkgLength NameString MethodFlags TermList.
 * MethodFlags: ArgCount bits 0-2, SerializeFlag bit 3, SyncLevel bits 7-4 left 0.
 */
export function method(path: string, terms: readonly Uint8Array[], opts: MethodOptions = {}): Uint8Array {
  const args = opts.args ?? 0;
  if (!Number.isInteger(args) || args < 0 || args > 7) throw amlError("AML methods take 0-7 arguments");
  const flags = args | (opts.serialized === true ? 0x08 : 0);
  const body = concat([nameString(path), Uint8Array.of(flags), ...terms]);
  return concat([Uint8Array.of(OP.Method), pkgLength(body.length), body]);
}

/** A method whose body is `Return(value)`: enough for constant _STA/_ADR style methods. */
export function methodReturning(path: string, value: Uint8Array, opts: MethodOptions = {}): Uint8Array {
  return method(path, [returnValue(value)], opts);
}

/** DefReturn (ACPI 6.5 §20.2.5.3): ReturnOp ArgObject. */
export function returnValue(value: Uint8Array): Uint8Array {
  return concat([Uint8Array.of(OP.Return), value]);
}

/** ArgN (ACPI 6.5 §20.2.6.1): the method's N-th argument, N = 0..6. */
export function arg(n: number): Uint8Array {
  if (!Number.isInteger(n) || n < 0 || n > 6) throw amlError(`AML has Arg0 to Arg6, not Arg${n}`);
  return Uint8Array.of(OP.Arg0 + n);
}

/** DefLEqual (ACPI 6.5 §20.2.5.4): LEqualOp Operand Operand. */
export function lEqual(a: Uint8Array, b: Uint8Array): Uint8Array {
  return concat([Uint8Array.of(OP.LEqual), a, b]);
}

/** DefIfElse without Else (ACPI 6.5 §20.2.5.3): IfOp PkgLength Predicate TermList. */
export function ifThen(predicate: Uint8Array, terms: readonly Uint8Array[]): Uint8Array {
  const body = concat([predicate, ...terms]);
  return concat([Uint8Array.of(OP.If), pkgLength(body.length), body]);
}

/**
 * DefNotify (ACPI 6.5 §20.2.5.3): NotifyOp NotifyObject NotifyValue, with the
 * object named by path (a SuperName) and the value an integer (§5.6.6 lists the values).
 */
export function notify(path: string, value: number): Uint8Array {
  checkRange("Notify value", value, 0xff);
  return concat([Uint8Array.of(OP.Notify), nameString(path), integer(value)]);
}

// ---------------------------------------------------------------------------
// Resource descriptors (ACPI 6.5 §6.4), for _CRS buffers.

function u16le(v: number): number[] {
  return [v & 0xff, (v >>> 8) & 0xff];
}
function u32le(v: number): number[] {
  return [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];
}
function u64le(v: number): number[] {
  const lo = v % 2 ** 32;
  const hi = Math.floor(v / 2 ** 32);
  return [...u32le(lo), ...u32le(hi)];
}

function checkRange(what: string, v: number, max: number): void {
  if (!Number.isSafeInteger(v) || v < 0 || v > max) throw amlError(`${what} 0x${v.toString(16)} out of range`);
}

/**
 * I/O Port Descriptor (ACPI 6.5 §6.4.2.5), 16-bit decode: `IO(Decode16, min, max, align, len)`.
 */
export function ioPort(min: number, max: number, alignment: number, length: number): Uint8Array {
  checkRange("I/O port", min, 0xffff);
  checkRange("I/O port", max, 0xffff);
  checkRange("I/O alignment", alignment, 0xff);
  checkRange("I/O length", length, 0xff);
  return Uint8Array.from([0x47, 0x01, ...u16le(min), ...u16le(max), alignment, length]);
}

/**
 * IRQ Descriptor without the information byte (ACPI 6.5 §6.4.2.1): `IRQNoFlags(){n}`,
 * meaning ISA semantics: edge-triggered, active-high, exclusive.
 */
export function irqNoFlags(irqs: readonly number[]): Uint8Array {
  let mask = 0;
  for (const irq of irqs) {
    checkRange("ISA IRQ", irq, 15);
    mask |= 1 << irq;
  }
  return Uint8Array.from([0x22, ...u16le(mask)]);
}

/** Interrupt triggering and polarity of an Extended Interrupt Descriptor (ACPI 6.5 Table 6.47). */
export interface InterruptMode {
  edge: boolean;
  activeLow: boolean;
  shared: boolean;
}

/**
 * Extended Interrupt Descriptor (ACPI 6.5 §6.4.3.6): `Interrupt(ResourceConsumer, ...){gsi, ...}`
 * naming GSIs directly (no ResourceSource). Flags byte: bit 0 consumer, bit 1 edge,
 * bit 2 active-low, bit 3 shared; then the count and one DWord per interrupt.
 */
export function extendedInterrupt(mode: InterruptMode, gsis: readonly number[]): Uint8Array {
  if (gsis.length === 0 || gsis.length > 255) throw amlError("an Extended Interrupt Descriptor lists 1-255 interrupts");
  for (const g of gsis) checkRange("interrupt number", g, 0xffff_ffff);
  const flags = 0x01 | (mode.edge ? 0x02 : 0) | (mode.activeLow ? 0x04 : 0) | (mode.shared ? 0x08 : 0);
  return Uint8Array.from([0x89, ...u16le(2 + 4 * gsis.length), flags, gsis.length, ...gsis.flatMap(u32le)]);
}

/** 32-bit Fixed Memory Range Descriptor (ACPI 6.5 §6.4.3.4). */
export function memory32Fixed(writable: boolean, base: number, length: number): Uint8Array {
  checkRange("memory base", base, 0xffff_ffff);
  checkRange("memory length", length, 0xffff_ffff);
  return Uint8Array.from([0x86, ...u16le(9), writable ? 1 : 0, ...u32le(base), ...u32le(length)]);
}

/** Resource type of an address space descriptor (ACPI 6.5 §6.4.3.5, Table 6.42). */
export const ResourceType = { Memory: 0, Io: 1, BusNumber: 2 } as const;

/**
 * Word/DWord/QWord Address Space Descriptors (ACPI 6.5 §6.4.3.5.1-3) with a
 * producer window [min, min+length) and zero translation, as a PCI host bridge's
 * _CRS lists its bus, I/O and memory windows. `typeFlags` is the type-specific
 * byte (for memory: bit 0 read-write, bits 2:1 cacheability; for I/O: 3 = ISA and non-ISA ranges).
 */
export function addressSpace(
  width: 16 | 32 | 64,
  resourceType: number,
  min: number,
  length: number,
  typeFlags: number,
): Uint8Array {
  const maxValue = width === 64 ? Number.MAX_SAFE_INTEGER : 2 ** width - 1;
  if (length <= 0) throw amlError("address space window must not be empty");
  checkRange("address window start", min, maxValue);
  checkRange("address window end", min + length - 1, maxValue);
  checkRange("resource type", resourceType, 0xff);
  checkRange("type-specific flags", typeFlags, 0xff);
  const enc = width === 16 ? (v: number) => u16le(v) : width === 32 ? (v: number) => u32le(v) : (v: number) => u64le(v);
  // General flags: bit 3 MaxFixed, bit 2 MinFixed, bit 1 decode positive, bit 0 = 0 producer.
  const general = 0x0c;
  const fields = [...enc(0), ...enc(min), ...enc(min + length - 1), ...enc(0), ...enc(length)];
  const tag = width === 16 ? 0x88 : width === 32 ? 0x87 : 0x8a;
  return Uint8Array.from([tag, ...u16le(3 + fields.length), resourceType, general, typeFlags, ...fields]);
}

/**
 * ResourceTemplate: the descriptors followed by End Tag (ACPI 6.5 §6.4.2.9) in a
 * Buffer. The End Tag checksum byte is 0, which the spec defines as "treat as valid".
 */
export function resourceTemplate(descriptors: readonly Uint8Array[]): Uint8Array {
  return buffer(concat([...descriptors, Uint8Array.of(0x79, 0x00)]));
}
