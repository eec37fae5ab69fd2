// The noisy neighbour: holds most of its memory limit and burns CPU until told to stop.
exports.handler = async (event) => {
  const mb = event.mb || 200;
  const hold = [];
  for (let i = 0; i < mb; i++) hold.push(Buffer.alloc(1024 * 1024, 1));
  const until = Date.now() + (event.ms || 10000);
  let x = 0;
  while (Date.now() < until) for (let i = 0; i < 1e5; i++) x += i;
  return { held: hold.length, x };
};
