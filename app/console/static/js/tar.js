// A folder chosen or dropped in the browser, packed into one uncompressed tar (POSIX pax) for
// the ordinary dataset upload. Nothing is read into memory: the Blob refers to the files, and the
// browser streams them while it uploads. (ustar takes a few lines; a zip writer would need a CRC
// of every byte first, and JPEGs do not compress anyway.)

const encoder = new TextEncoder();
const BLOCK = 512;

function field(header, offset, length, text) {
  const bytes = encoder.encode(text);
  if (bytes.length > length) throw new Error(`"${text}" is too long for a tar header`);
  header.set(bytes, offset);
}

const octal = (n, length) => n.toString(8).padStart(length - 1, "0") + "\0";

// ustar keeps a path of up to 100 bytes in `name`, or split at a "/" into prefix (155) + name (100);
// null when it fits neither way (the path then goes in a pax extended header before the file).
function splitPath(path) {
  if (encoder.encode(path).length <= 100) return ["", path];
  for (let cut = path.indexOf("/"); cut > 0; cut = path.indexOf("/", cut + 1)) {
    const [prefix, name] = [path.slice(0, cut), path.slice(cut + 1)];
    if (encoder.encode(prefix).length <= 155 && encoder.encode(name).length <= 100) return [prefix, name];
  }
  return null;
}

// A pax record is "<length> path=<value>\n", its length counting its own digits.
function paxRecord(key, value) {
  const body = ` ${key}=${value}\n`;
  const bodyLength = encoder.encode(body).length;
  let length = bodyLength + 1;
  while (String(length).length + bodyLength !== length) length = String(length).length + bodyLength;
  return encoder.encode(`${length}${body}`);
}

function header(path, size, modified, type = "0") {
  const block = new Uint8Array(BLOCK);
  const [prefix, name] = splitPath(path) ?? ["", path.slice(0, 90).replace(/[^\x20-\x7e]/g, "_")];
  field(block, 0, 100, name);
  field(block, 100, 8, octal(0o644, 8));
  field(block, 108, 8, octal(0, 8));
  field(block, 116, 8, octal(0, 8));
  field(block, 124, 12, octal(size, 12));
  field(block, 136, 12, octal(Math.floor(modified / 1000), 12));
  field(block, 156, 1, type);  // "0": a regular file; "x": the pax header of the next one
  field(block, 257, 6, "ustar\0");
  field(block, 263, 2, "00");
  field(block, 345, 155, prefix);
  block.fill(0x20, 148, 156);  // the checksum counts its own field as spaces
  const sum = block.reduce((total, byte) => total + byte, 0);
  field(block, 148, 8, sum.toString(8).padStart(6, "0") + "\0 ");
  return block;
}

export function tarBlob(entries) {
  const parts = [];
  const add = (block, content, size) => {
    parts.push(block, content);
    const padding = (BLOCK - (size % BLOCK)) % BLOCK;
    if (padding) parts.push(new Uint8Array(padding));
  };
  for (const { path, file } of entries) {
    const modified = file.lastModified || Date.now();
    if (!splitPath(path)) {
      const record = paxRecord("path", path);
      add(header("PaxHeader", record.length, modified, "x"), record, record.length);
    }
    add(header(path, file.size, modified), file, file.size);
  }
  parts.push(new Uint8Array(2 * BLOCK));  // the end of the archive
  return new Blob(parts, { type: "application/x-tar" });
}
